"""`teaserve generate`: one generation from the command line, with a progress bar."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..engine import EngineArgs, Omni
from .args import sampling_params


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index}{path.suffix}") for index in range(count)]


def run(args: argparse.Namespace) -> int:
    if len(args.model_and_prompt) > 2:
        raise ValueError("give at most a model and a prompt (quote the prompt)")
    model, prompt = (None, *args.model_and_prompt) if len(args.model_and_prompt) == 1 else args.model_and_prompt
    params = sampling_params(args)
    engine_args = dataclasses.replace(EngineArgs.from_cli_args(args), model=model)
    media = {"image": args.image} if args.image else {}
    if args.mask:
        media["mask"] = args.mask
    started = time.perf_counter()
    with Omni(engine_args) as omni:
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
