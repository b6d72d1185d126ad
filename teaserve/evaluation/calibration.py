"""Fitting TeaCache's rescaling polynomial to a model, over several step counts.

Prompts run uncached at every step count while `record_gate_changes` records, per step and CFG branch, the
relative L1 change of the gate signal (x) and of the block stack's output (y). A degree-4 polynomial of y over x
is fitted to all of them together; the profile keeps the x range it was fitted on, outside which TeaCache does
not trust it, and the step counts.

Output change is only a proxy of what a skipped step costs the final image, so with validation prompts the fit
is also checked where it matters: the polynomials between the fit and its mean value (shrinkage 1 to 0) run a
threshold sweep at every step count, and the one with the best PSNR against uncached at equal block-stack
evaluations is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..cache import Rescaling, record_gate_changes
from ..engine import AsyncEngine, OmniDiffusionSamplingParams
from ..pipelines import LoadedModel
from .bench import BenchRow, run_bench
from .sweeps import SHRINKAGES, VALIDATION_SPEEDUPS, VALIDATION_THRESHOLDS, Variant

Pair = tuple[float, float]


@dataclass
class Fit:
    coefficients: list[float]
    r2: float
    points: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    y_mean: float


def fit_polynomial(x: np.ndarray, y: np.ndarray, degree: int = 4) -> Fit:
    if len(x) <= degree:
        raise ValueError(f"need more than {degree} (gate change, output change) pairs to fit, got {len(x)}")
    coefficients = np.polyfit(x, y, degree)
    residual = ((np.polyval(coefficients, x) - y) ** 2).sum()
    total = ((y - y.mean()) ** 2).sum()
    return Fit(
        coefficients=[float(c) for c in coefficients],
        r2=float(1 - residual / total) if total > 0 else 1.0,
        points=len(x),
        x_range=(float(x.min()), float(x.max())),
        y_range=(float(y.min()), float(y.max())),
        y_mean=float(y.mean()),
    )


def shrunk(fit: Fit, shrinkage: float) -> list[float]:
    """shrinkage * fit + (1 - shrinkage) * mean output change: 1 is the fit, 0 a constant (fixed intervals)."""
    coefficients = [shrinkage * c for c in fit.coefficients]
    coefficients[-1] += (1 - shrinkage) * fit.y_mean
    return coefficients


def coefficient_settings(fit: Fit, shrinkage: float) -> dict[str, Any]:
    """tea_cache settings for a shrinkage of the fit, with the range it was fitted on."""
    return {"coefficients": shrunk(fit, shrinkage), "x_range": list(fit.x_range)}


def usable(coefficients: list[float], x_range: tuple[float, float]) -> bool:
    """Whether TeaCache accepts the polynomial on its range (positive there, bounded coefficients)."""
    try:
        Rescaling(tuple(coefficients), x_range)
    except ValueError:
        return False
    return True


def psnr_at_speedups(sweeps: Sequence[Sequence[BenchRow]], speedups=VALIDATION_SPEEDUPS) -> list[float]:
    """Mean PSNR of each variant's threshold sweep, interpolated at the given ideal speedups that every sweep
    reaches (so that no variant is scored where it was never measured)."""
    reached = min(max(row.ideal_speedup for row in rows) for rows in sweeps)
    points = [speedup for speedup in speedups if speedup <= reached] or [reached]
    scores = []
    for rows in sweeps:
        curve = sorted((row.ideal_speedup, row.psnr_mean) for row in rows)
        scores.append(float(np.mean(np.interp(points, [p[0] for p in curve], [p[1] for p in curve]))))
    return scores


@dataclass
class Calibration:
    pairs: dict[int, dict[str, list[Pair]]]
    """Recorded (gate change, output change) pairs by step count, then CFG branch."""
    fit: Fit
    shrinkage: float
    scores: dict[str, float] = field(default_factory=dict)
    """Validation: mean PSNR (over step counts) by shrinkage."""
    validation_prompts: int = 0

    @property
    def coefficients(self) -> list[float]:
        return shrunk(self.fit, self.shrinkage)

    @property
    def step_counts(self) -> list[int]:
        return sorted(self.pairs)

    def points(self, steps: int | None = None, branch: str | None = None) -> np.ndarray:
        """The pairs as an array [n, 2], optionally of one step count and/or branch."""
        pairs = [
            pair
            for step_count, branches in self.pairs.items()
            if steps in (None, step_count)
            for name, branch_pairs in branches.items()
            if branch in (None, name)
            for pair in branch_pairs
        ]
        return np.array(pairs, dtype=np.float64).reshape(-1, 2)


def record(
    engine: AsyncEngine,
    prompts: Sequence[str],
    seeds: Sequence[int],
    params: OmniDiffusionSamplingParams,
    step_counts: Sequence[int],
    log: Callable[[str], None] = lambda message: None,
) -> dict[int, dict[str, list[Pair]]]:
    """Run every prompt x seed uncached at every step count, recording gate and output changes."""
    pairs: dict[int, dict[str, list[Pair]]] = {}
    with record_gate_changes(engine.model.pipeline.transformer) as recorder:
        for steps in step_counts:
            step_pairs = pairs.setdefault(steps, {})
            for prompt in prompts:
                for seed in seeds:
                    settings = {"enabled": False} if engine.cache.name != "none" else None
                    request = engine.prepare(
                        prompt, params.replace(num_inference_steps=steps, seed=seed, cache_config=settings)
                    )
                    engine.submit(request, block=True).result()
                    for branch, branch_pairs in recorder.take().items():
                        step_pairs.setdefault(branch, []).extend(branch_pairs)
            log(f"{steps} steps: {sum(map(len, step_pairs.values()))} pairs recorded")
    return pairs


def validate(
    engine: AsyncEngine,
    fit: Fit,
    shrinkages: Sequence[float],
    prompts: Sequence[str],
    params: OmniDiffusionSamplingParams,
    step_counts: Sequence[int],
    log: Callable[[str], None] = lambda message: None,
) -> tuple[float, dict[str, float]]:
    """The shrinkage whose threshold sweeps keep the most PSNR at equal block-stack evaluations, over all step
    counts."""
    variants = [Variant(f"{shrinkage:g}", coefficient_settings(fit, shrinkage)) for shrinkage in shrinkages]
    scores: dict[str, list[float]] = {variant.name: [] for variant in variants}
    for steps in step_counts:
        rows = run_bench(
            engine,
            prompts,
            [0],
            VALIDATION_THRESHOLDS,
            variants=variants,
            params=params.replace(num_inference_steps=steps),
            warmup=0,
        )
        sweeps = [[row for row in rows if row.variant == variant.name] for variant in variants]
        for variant, score in zip(variants, psnr_at_speedups(sweeps), strict=True):
            scores[variant.name].append(score)
        log(f"{steps} steps validated")
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    return float(max(means, key=lambda name: means[name])), means


def calibrate(
    model: LoadedModel,
    prompts: Sequence[str],
    validation_prompts: Sequence[str],
    seeds: Sequence[int],
    params: OmniDiffusionSamplingParams,
    step_counts: Sequence[int],
    log: Callable[[str], None] = lambda message: None,
) -> Calibration:
    """Record on `prompts` at every step count, fit, and (with `validation_prompts`) choose the shrinkage.

    Recording needs no cache (the engine runs uncached); validation runs TeaCache with the fitted coefficients,
    so a model without built-in coefficients can be calibrated too.
    """
    recording = AsyncEngine(model, cache_backend="none")
    try:
        pairs = record(recording, prompts, seeds, params, step_counts, log)
    finally:
        recording.shutdown()
    everything = np.array([pair for step_pairs in pairs.values() for branch in step_pairs.values() for pair in branch])
    fit = fit_polynomial(everything[:, 0], everything[:, 1])
    # TeaCache refuses polynomials that are not positive over their range; the largest usable shrinkage is the
    # default, validation chooses among the usable ones.
    shrinkages = [shrinkage for shrinkage in SHRINKAGES if usable(shrunk(fit, shrinkage), fit.x_range)]
    if not shrinkages:
        raise ValueError("no shrinkage of the fit is positive over the fitted range: record more prompts")
    calibration = Calibration(pairs, fit, shrinkages[0])
    if validation_prompts:
        settings = coefficient_settings(fit, shrinkages[0])
        validating = AsyncEngine(model, cache_backend="tea_cache", cache_config=settings)
        try:
            calibration.shrinkage, calibration.scores = validate(
                validating, fit, shrinkages, validation_prompts, params, step_counts, log
            )
        finally:
            validating.shutdown()
        calibration.validation_prompts = len(validation_prompts)
    return calibration


def report(calibration: Calibration) -> list[str]:
    """The calibration in words, line by line."""
    fit = calibration.fit
    lines = [
        f"{fit.points} points (all step counts and branches), gate change x in [{fit.x_range[0]:.4g}, "
        f"{fit.x_range[1]:.4g}], output change y in [{fit.y_range[0]:.4g}, {fit.y_range[1]:.4g}]"
    ]
    branches = sorted({name for step_pairs in calibration.pairs.values() for name in step_pairs})
    for steps in calibration.step_counts:
        points = calibration.points(steps)
        lines.append(
            f"  {steps} steps: {len(points)} points, x in [{points[:, 0].min():.4g}, {points[:, 0].max():.4g}], "
            f"R^2 of the joint fit on them {_r2(fit.coefficients, points):.3f}"
        )
    for branch in branches:
        points = calibration.points(branch=branch)
        r2 = _r2(fit.coefficients, points)
        lines.append(f"  branch {branch}: {len(points)} points, R^2 of the joint fit on them {r2:.3f}")
    lines.append(f"degree-4 fit of output change (highest power first), R^2 {fit.r2:.4f}:")
    lines.append("  " + _rounded(fit.coefficients))
    if calibration.scores:
        lines.append(
            f"validation on {calibration.validation_prompts} other prompts at {calibration.step_counts} steps, mean "
            f"PSNR at up to {VALIDATION_SPEEDUPS}x fewer block evaluations, by shrinkage towards the mean: "
            + ", ".join(f"{name}: {value:.2f} dB" for name, value in calibration.scores.items())
        )
    lines.append(f"coefficients (shrinkage {calibration.shrinkage:g}): {_rounded(calibration.coefficients)}")
    return lines


def _r2(coefficients: list[float], points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    total = ((y - y.mean()) ** 2).sum()
    return float(1 - ((np.polyval(coefficients, x) - y) ** 2).sum() / total) if total > 0 else 1.0


def _rounded(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{value:.8g}" for value in values) + "]"


def profile(
    model: LoadedModel, calibration: Calibration, prompts: Sequence[str], seeds: Sequence[int]
) -> dict[str, Any]:
    """The calibration record (`coefficients_file` reads its coefficients and x_range)."""
    fit = calibration.fit
    return {
        "model": model.name,
        "transformer": type(model.pipeline.transformer).__name__,
        "num_inference_steps": calibration.step_counts,
        "prompts": len(prompts),
        "seeds": list(seeds),
        "branches": sorted({name for step_pairs in calibration.pairs.values() for name in step_pairs}),
        "coefficients": calibration.coefficients,
        "x_range": list(fit.x_range),
        "fit_coefficients": fit.coefficients,
        "shrinkage": calibration.shrinkage,
        "validation": {"prompts": calibration.validation_prompts, "psnr_by_shrinkage": calibration.scores},
        "r2": fit.r2,
        "points": fit.points,
        "y_range": list(fit.y_range),
        "by_steps": {
            str(steps): {
                "points": len(points),
                "x_range": [float(points[:, 0].min()), float(points[:, 0].max())],
                "r2": _r2(fit.coefficients, points),
            }
            for steps in calibration.step_counts
            for points in [calibration.points(steps)]
        },
    }
