"""`teaserve generate`: one generation from the command line, with a progress bar."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..engine import Omni, OmniDiffusionSamplingParams
from ..engine.params import parse_size


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index}{path.suffix}") for index in range(count)]


def run(args: argparse.Namespace) -> int:
    if len(args.model_and_prompt) > 2:
        raise ValueError("give at most a model and a prompt (quote the prompt)")
    model, prompt = (None, *args.model_and_prompt) if len(args.model_and_prompt) == 1 else args.model_and_prompt
    width, height = parse_size(args.size) if args.size else (None, None)
    params = OmniDiffusionSamplingParams(
        num_inference_steps=args.steps,
        width=width,
        height=height,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
        guidance_scale=args.guidance_scale,
        num_outputs_per_prompt=args.num_images,
        layers=args.layers,
        resolution=args.resolution,
        cache_config=args.request_cache_config,
    )
    media = {"image": args.image} if args.image else {}
    if args.mask:
        media["mask"] = args.mask
    started = time.perf_counter()
    with Omni(model, args.cache_backend, args.cache_config, args.device, args.dtype) as omni:
        loaded = time.perf_counter()
        request = {"prompt": prompt, "multi_modal_data": media}
        with tqdm(total=None, desc="denoising", unit="step", file=sys.stderr) as bar:

            def on_progress(event) -> None:
                bar.total = event.total
                bar.update(event.step - bar.n)

            (output,) = omni.generate(request, params, on_progress=on_progress)
    paths = output_paths(args.output, len(output.images))
    for path, image in zip(paths, output.images, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"saved {path} ({image.width}x{image.height})")
    metrics = output.metrics
    print(
        f"seed {output.seed}; {metrics.steps} steps in {metrics.seconds:.2f} s "
        f"(model load {loaded - started:.1f} s, {metrics.transformer_calls} transformer calls)"
    )
    if metrics.cache:
        print(f"cache: {format_cache_stats(metrics.cache)}")
    return 0


def format_cache_stats(stats: dict) -> str:
    branches = stats.get("branches", {})
    parts = [f"{name}: {b['computed_steps']} computed, {b['skipped_steps']} skipped" for name, b in branches.items()]
    return "; ".join(parts) or str(stats)
