"""Cached against uncached, side by side in one run, on the same prompts and seeds.

For every prompt and seed the uncached image is generated first, then the cached ones at each (variant,
threshold), on the same loaded model; speed is the ratio of summed times measured in this same run, quality the
PSNR (float64) and SSIM of each cached image against its uncached twin.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine import AsyncEngine, OmniDiffusionSamplingParams, RequestOutput
from .metrics import PSNR_CAP_DB, psnr, ssim
from .prompts import Checker
from .sweeps import Variant


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


def block_stack_evaluations(output: RequestOutput) -> int:
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
        self.evaluations += block_stack_evaluations(output)
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
    log: Callable[[str], None] = lambda message: None,
) -> list[BenchRow]:
    """Run every prompt x seed uncached and at each (variant, threshold); return one row per configuration.

    A variant's settings are the engine's cache settings with the variant's on top (server-side: they may carry
    coefficients); the engine's own settings are back in force afterwards.
    """
    cache = engine.cache
    if cache.name == "none":
        raise ValueError("bench needs an engine with a cache backend, e.g. cache_backend='tea_cache'")
    base = params or OmniDiffusionSamplingParams()
    own_settings = dict(cache.settings)
    variant_settings = [cache.merge_settings(own_settings, variant.settings) for variant in variants]

    def generate(prompt: str, seed: int, request_settings: dict[str, Any]) -> RequestOutput:
        request = engine.prepare(prompt, base.replace(seed=seed, cache_config=request_settings))
        return engine.submit(request, block=True).result()

    configs = [(index, threshold) for index in range(len(variants)) for threshold in thresholds]
    reference_totals = _Totals()
    totals = [_Totals() for _ in configs]
    try:
        for settings in variant_settings:  # refuse bad variant settings before the long run
            cache.configure(settings)
        for _ in range(warmup):
            generate(prompts[0], seeds[0], {"enabled": False})
        for prompt_index, prompt in enumerate(prompts):
            for seed in seeds:
                reference = generate(prompt, seed, {"enabled": False})
                reference_totals.add(reference, None, checker)
                for key, (variant_index, threshold) in enumerate(configs):
                    cache.configure(variant_settings[variant_index])
                    totals[key].add(generate(prompt, seed, {"rel_l1_thresh": threshold}), reference, checker)
            log(f"prompt {prompt_index + 1}/{len(prompts)} done")
    finally:
        cache.configure(own_settings)

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
    rows += [row(variants[index].name, threshold, totals[key]) for key, (index, threshold) in enumerate(configs)]
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
        raise ValueError("plotting needs matplotlib: pip install 'teaserve[dev]' (or pip install matplotlib)") from None
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
