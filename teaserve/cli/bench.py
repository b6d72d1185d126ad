"""`teaserve bench`: cached against uncached, side by side in one run, on the same prompts and seeds.

For every prompt and seed the uncached image is generated first, then the cached ones at each threshold, on the
same loaded model; speed is the ratio of summed times measured in this same run, quality the PSNR (float64)
and SSIM of each cached image against its uncached twin.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..engine import AsyncEngine, OmniDiffusionSamplingParams, RequestOutput
from ..engine.params import parse_size
from ..pipelines.default_model import SERVED_MODEL_NAME, shapes

GENERIC_PROMPTS = (
    "a cat sitting on a windowsill at sunset",
    "a red sports car on a mountain road",
    "a bowl of fruit on a wooden table, still life painting",
    "a lighthouse on a rocky coast during a storm",
    "a futuristic city skyline at night with neon lights",
    "a watercolor painting of a fox in a snowy forest",
    "a cup of coffee with latte art, top view",
    "an astronaut riding a horse on the moon",
)
DEFAULT_THRESHOLDS = (0.1, 0.2, 0.4, 0.6, 0.8)
PSNR_CAP_DB = 100.0
"""Identical images have infinite PSNR; averages count them as this."""

Checker = Callable[[str, Image.Image], bool]


@dataclass
class Variant:
    """A named set of cache settings the thresholds are applied on top of (e.g. other coefficients)."""

    name: str
    cache_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchRow:
    variant: str
    threshold: float | None
    """None for the uncached reference."""
    requests: int
    block_stack_evaluations: float
    """Mean per request, all CFG branches together."""
    seconds: float
    transformer_seconds: float | None
    speedup: float
    """End-to-end: uncached seconds / these seconds, summed over the same requests."""
    transformer_speedup: float | None
    ideal_speedup: float
    """Uncached block-stack evaluations / these: what a free gate and free skips would give."""
    psnr_mean: float
    psnr_min: float
    ssim_mean: float
    caption_accuracy: float | None = None

    @property
    def realized_over_ideal(self) -> float:
        return self.speedup / self.ideal_speedup

    @property
    def transformer_realized_over_ideal(self) -> float | None:
        return None if self.transformer_speedup is None else self.transformer_speedup / self.ideal_speedup


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64)).permute(2, 0, 1)[None]


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB over 0..255 pixels, computed in float64; capped for identical images."""
    error = float(((_as_tensor(image) - _as_tensor(reference)) ** 2).mean())
    return PSNR_CAP_DB if error == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0**2 / error))


def ssim(image: Image.Image, reference: Image.Image) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(_as_tensor(image), _as_tensor(reference), data_range=255.0))


def _block_stack_evaluations(output: RequestOutput) -> int:
    cache = output.metrics.cache
    if cache and cache.get("enabled"):
        return cache["computed_steps"]
    return output.metrics.transformer_calls


@dataclass
class _Totals:
    requests: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    transformer_seconds: float = 0.0
    psnrs: list[float] = field(default_factory=list)
    ssims: list[float] = field(default_factory=list)
    passes: list[bool] = field(default_factory=list)

    def add(self, output: RequestOutput, reference: RequestOutput | None, checker: Checker | None) -> None:
        self.requests += 1
        self.evaluations += _block_stack_evaluations(output)
        self.seconds += output.metrics.seconds
        self.transformer_seconds += output.metrics.transformer_seconds or 0.0
        for index, image in enumerate(output.images):
            if reference is not None:
                self.psnrs.append(psnr(image, reference.images[index]))
                self.ssims.append(ssim(image, reference.images[index]))
            if checker is not None:
                self.passes.append(bool(checker(output.prompt, image)))


def run_bench(
    engine: AsyncEngine,
    prompts: Sequence[str],
    seeds: Sequence[int],
    thresholds: Sequence[float],
    *,
    variants: Sequence[Variant] = (Variant("tea_cache"),),
    params: OmniDiffusionSamplingParams | None = None,
    checker: Checker | None = None,
    warmup: int = 1,
    log=lambda message: None,
) -> list[BenchRow]:
    """Run every prompt x seed uncached and at each (variant, threshold); return one row per configuration."""
    if engine.cache_backend_name != "tea_cache":
        raise ValueError("bench needs an engine built with cache_backend='tea_cache'")
    base = params or OmniDiffusionSamplingParams()

    def generate(prompt: str, seed: int, cache_config: dict[str, Any]) -> RequestOutput:
        request = engine.prepare(prompt, base.replace(seed=seed, cache_config=cache_config))
        return engine.submit(request, block=True).result()

    for _ in range(warmup):
        generate(prompts[0], seeds[0], {"enabled": False})
    configs = [(variant, threshold) for variant in variants for threshold in thresholds]
    reference_totals = _Totals()
    totals = {config_key: _Totals() for config_key in range(len(configs))}
    for prompt_index, prompt in enumerate(prompts):
        for seed in seeds:
            reference = generate(prompt, seed, {"enabled": False})
            reference_totals.add(reference, None, checker)
            for key, (variant, threshold) in enumerate(configs):
                output = generate(prompt, seed, {**variant.cache_config, "rel_l1_thresh": threshold})
                totals[key].add(output, reference, checker)
        log(f"prompt {prompt_index + 1}/{len(prompts)} done")

    def row(variant: str, threshold: float | None, result: _Totals) -> BenchRow:
        profiled = reference_totals.transformer_seconds > 0
        return BenchRow(
            variant=variant,
            threshold=threshold,
            requests=result.requests,
            block_stack_evaluations=result.evaluations / result.requests,
            seconds=result.seconds,
            transformer_seconds=result.transformer_seconds if profiled else None,
            speedup=reference_totals.seconds / result.seconds,
            transformer_speedup=reference_totals.transformer_seconds / result.transformer_seconds if profiled else None,
            ideal_speedup=reference_totals.evaluations / result.evaluations,
            psnr_mean=float(np.mean(result.psnrs)) if result.psnrs else PSNR_CAP_DB,
            psnr_min=float(np.min(result.psnrs)) if result.psnrs else PSNR_CAP_DB,
            ssim_mean=float(np.mean(result.ssims)) if result.ssims else 1.0,
            caption_accuracy=float(np.mean(result.passes)) if result.passes else None,
        )

    rows = [row("uncached", None, reference_totals)]
    rows += [row(variant.name, threshold, totals[key]) for key, (variant, threshold) in enumerate(configs)]
    return rows


def format_table(rows: Sequence[BenchRow]) -> str:
    header = (
        f"{'variant':<14} {'thresh':>6} {'blocks/req':>10} {'speedup':>7} {'tf-speedup':>10} {'ideal':>6} "
        f"{'real/ideal':>10} {'PSNR dB':>8} {'min dB':>7} {'SSIM':>6} {'captions':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        threshold = "-" if r.threshold is None else f"{r.threshold:g}"
        tf = "-" if r.transformer_speedup is None else f"{r.transformer_speedup:.2f}x"
        captions = "-" if r.caption_accuracy is None else f"{100 * r.caption_accuracy:.1f}%"
        psnr_mean = "inf" if r.psnr_mean >= PSNR_CAP_DB else f"{r.psnr_mean:.2f}"
        psnr_min = "inf" if r.psnr_min >= PSNR_CAP_DB else f"{r.psnr_min:.2f}"
        lines.append(
            f"{r.variant:<14} {threshold:>6} {r.block_stack_evaluations:>10.2f} {r.speedup:>6.2f}x {tf:>10} "
            f"{r.ideal_speedup:>5.2f}x {r.realized_over_ideal:>10.3f} {psnr_mean:>8} {psnr_min:>7} "
            f"{r.ssim_mean:>6.4f} {captions:>8}"
        )
    return "\n".join(lines)


def rows_as_json(rows: Sequence[BenchRow], **context) -> str:
    payload = {
        **context,
        "rows": [
            {
                **asdict(r),
                "realized_over_ideal": r.realized_over_ideal,
                "transformer_realized_over_ideal": r.transformer_realized_over_ideal,
            }
            for r in rows
        ],
    }
    return json.dumps(payload, indent=2)


def plot(rows: Sequence[BenchRow], path: str | Path, title: str) -> None:
    """Speedup against mean PSNR, one curve per variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'teaserve[dev]' (or pip install matplotlib)") from None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(r.variant for r in rows if r.threshold is not None):
        points = sorted((r.speedup, r.psnr_mean, r.threshold) for r in rows if r.variant == variant)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=variant)
        for speedup, value, threshold in points:
            axis.annotate(f"{threshold:g}", (speedup, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel("end-to-end speedup vs uncached (same run)")
    axis.set_ylabel("mean PSNR vs uncached (dB)")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def sweep_params(args: argparse.Namespace) -> OmniDiffusionSamplingParams:
    """The sampling of a bench or calibration sweep: the model's defaults unless the flags say otherwise."""
    width, height = parse_size(args.size) if args.size else (None, None)
    return OmniDiffusionSamplingParams(
        num_inference_steps=args.steps, width=width, height=height, true_cfg_scale=args.true_cfg_scale
    )


def run(args: argparse.Namespace) -> int:
    params = sweep_params(args)
    engine = AsyncEngine(
        args.model,
        cache_backend="tea_cache",
        cache_config=args.cache_config,
        device=args.device,
        dtype=args.dtype,
        profile=True,
    )
    started = time.perf_counter()
    try:
        prompts, checker = model_prompts(args, engine.model.name, held_out=True)
        prompts = prompts[: args.num_prompts or 32]
        rows = run_bench(
            engine,
            prompts,
            args.seeds,
            args.thresholds,
            variants=args.variant or [Variant("tea_cache")],
            params=params,
            checker=checker,
            warmup=args.warmup,
            log=lambda m: print(m, file=sys.stderr),
        )
    finally:
        engine.shutdown()
    request = engine.prepare(prompts[0], params)
    print(
        f"model {engine.model.name}: {len(prompts)} prompts x {len(args.seeds)} seeds, {request.num_inference_steps} "
        f"steps, {request.width}x{request.height}, true CFG {request.true_cfg_scale:g} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    print(format_table(rows))
    context = {
        "model": engine.model.name,
        "prompts": len(prompts),
        "seeds": list(args.seeds),
        "steps": request.num_inference_steps,
        "size": f"{request.width}x{request.height}",
        "true_cfg_scale": request.true_cfg_scale,
    }
    if args.json:
        Path(args.json).write_text(rows_as_json(rows, **context) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, f"TeaCache on {engine.model.name}")
        print(f"wrote {args.plot}")
    return 0


def model_prompts(args: argparse.Namespace, model_name: str, *, held_out: bool) -> tuple[list[str], Checker | None]:
    """Every candidate prompt (callers take the first ones) and, for the shapes model, its caption checker.

    The shapes model is benchmarked on captions it never saw in training (`held_out`) and calibrated on
    training captions; other models use --prompts FILE (one per line) or a built-in generic set.
    """
    checker = None
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    elif model_name == SERVED_MODEL_NAME:
        training, held = shapes.split_scenes()
        prompts = [scene.caption for scene in (held if held_out else training)]
        checker = lambda prompt, image: shapes.check(image, prompt).passed_all  # noqa: E731
    else:
        prompts = list(GENERIC_PROMPTS)
    return prompts, checker
