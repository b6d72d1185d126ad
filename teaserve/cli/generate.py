"""`teaserve generate`: one generation from the command line, with a progress bar."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..engine import EngineArgs, GeneratedVideo, Omni
from .args import sampling_params

VIDEO_SUFFIXES = (".mp4", ".gif", ".webp")
VIDEO_FORMATS_ONLY = (".mp4",)
"""Suffixes only a video can be written to (GIF and WebP hold images as well)."""


def output_paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{index}{path.suffix}") for index in range(count)]


def save_video(video: GeneratedVideo, path: Path) -> None:
    """An MP4 (H.264), or an animated GIF or WebP, by the file's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mp4":
        path.write_bytes(video.mp4())
        return
    first, *rest = video.frames
    first.save(path, save_all=True, append_images=rest, duration=round(1000 / video.fps), loop=0)


def check_output_suffix(output: str | None, makes_video: bool) -> None:
    """Refuse an output file the generation cannot be written to, before the model runs."""
    if output is None:
        return
    suffix = Path(output).suffix.lower()
    if makes_video and suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"this model makes videos: -o must end in {', '.join(VIDEO_SUFFIXES)}, got {output!r}")
    if not makes_video and suffix in VIDEO_FORMATS_ONLY:
        raise ValueError(f"this model makes images: -o {output!r} names a video file; use e.g. out.png")


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
        check_output_suffix(args.output, omni.model.family.makes_video)
        request = {"prompt": prompt, "multi_modal_data": media}
        with tqdm(total=None, desc="denoising", unit="step", file=sys.stderr) as bar:

            def on_progress(event) -> None:
                bar.total = event.total
                bar.update(event.step - bar.n)

            (output,) = omni.generate(request, params, on_progress=on_progress)
    if output.videos:
        paths = output_paths(args.output or "out.mp4", len(output.videos))
        for path, video in zip(paths, output.videos, strict=True):
            save_video(video, path)
            print(f"saved {path} ({video.width}x{video.height}, {len(video.frames)} frames at {video.fps} fps)")
    else:
        paths = output_paths(args.output or "out.png", len(output.images))
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
