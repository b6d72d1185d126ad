"""`teaserve calibrate`: fit TeaCache's rescaling polynomial to a model.

Runs prompts uncached while recording, per step and per CFG branch, the relative L1 change of the gate signal
(the timestep-modulated input of the first block) and of the block stack's output; fits output change as a
degree-4 polynomial of gate change over all steps after the first, prints the fit and writes a profile that
`--cache-config '{"coefficients_file": PROFILE}'` loads.

Output change is only a proxy of what a skipped step costs the final image, so with `--validate N` the fit is
also checked on N other prompts: the polynomials between the fit and its mean value (shrinkage 0 to 1) run a
threshold sweep, and the one with the best PSNR against uncached at equal block-stack evaluations is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine import AsyncEngine
from .bench import BenchRow, Variant, model_prompts, run_bench, sweep_params

SHRINKAGES = (1.0, 0.75, 0.5, 0.25, 0.1)
VALIDATION_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8)
VALIDATION_SPEEDUPS = (2.0, 3.0, 4.0, 5.0)
"""Block-stack-evaluation speedups at which validation compares PSNR."""


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


def psnr_at_speedups(rows: list[BenchRow], speedups=VALIDATION_SPEEDUPS) -> float:
    """Mean PSNR, interpolated at the given ideal speedups, of one variant's threshold sweep."""
    points = sorted((row.ideal_speedup, row.psnr_mean) for row in rows)
    return float(np.mean(np.interp(speedups, [p[0] for p in points], [p[1] for p in points])))


def collect_pairs(cache_stats: dict) -> dict[str, list[tuple[float, float]]]:
    """(gate change, output change) per branch for every step where both are known."""
    return {
        name: [(x, y) for x, y in zip(branch["rel_l1"], branch["output_rel_l1"], strict=True) if None not in (x, y)]
        for name, branch in cache_stats["branches"].items()
    }


def record(engine: AsyncEngine, prompts: list[str], seeds, params) -> dict[str, list[tuple[float, float]]]:
    engine.cache.record_outputs()
    pairs: dict[str, list[tuple[float, float]]] = {}
    try:
        for index, prompt in enumerate(prompts):
            for seed in seeds:
                request = engine.prepare(prompt, params.replace(seed=seed))
                output = engine.submit(request, block=True).result()
                for branch, branch_pairs in collect_pairs(output.metrics.cache).items():
                    pairs.setdefault(branch, []).extend(branch_pairs)
            print(f"prompt {index + 1}/{len(prompts)} recorded", file=sys.stderr)
    finally:
        engine.cache.record_outputs(False)
    return pairs


def validate(engine: AsyncEngine, fit: Fit, prompts: list[str], params) -> tuple[float, dict[str, float]]:
    """The shrinkage whose threshold sweep keeps the most PSNR at equal block-stack evaluations."""
    variants = [Variant(f"{shrinkage:g}", {"coefficients": shrunk(fit, shrinkage)}) for shrinkage in SHRINKAGES]
    rows = run_bench(engine, prompts, [0], VALIDATION_THRESHOLDS, variants=variants, params=params, warmup=0)
    scores = {v.name: psnr_at_speedups([r for r in rows if r.variant == v.name]) for v in variants}
    best = max(scores, key=scores.get)
    return float(best), scores


@dataclass
class Calibration:
    pairs: dict[str, list[tuple[float, float]]]
    fit: Fit
    shrinkage: float
    scores: dict[str, float]
    validation_prompts: int

    @property
    def coefficients(self) -> list[float]:
        return shrunk(self.fit, self.shrinkage)


def calibrate(engine: AsyncEngine, prompts: list[str], validation: list[str], seeds, params) -> Calibration:
    """Record on `prompts`, fit, and (with `validation` prompts) choose the shrinkage of the fit."""
    pairs = record(engine, prompts, seeds, params)
    everything = np.array([pair for branch in pairs.values() for pair in branch])
    fit = fit_polynomial(everything[:, 0], everything[:, 1])
    shrinkage, scores = validate(engine, fit, validation, params) if validation else (1.0, {})
    return Calibration(pairs, fit, shrinkage, scores, len(validation))


def report(calibration: Calibration) -> None:
    fit = calibration.fit
    print(
        f"{fit.points} points (all branches), gate change x in [{fit.x_range[0]:.4g}, {fit.x_range[1]:.4g}], "
        f"output change y in [{fit.y_range[0]:.4g}, {fit.y_range[1]:.4g}]"
    )
    for branch, branch_pairs in calibration.pairs.items():
        values = np.array(branch_pairs)
        print(
            f"  branch {branch}: {len(values)} points, R^2 of its own fit "
            f"{fit_polynomial(values[:, 0], values[:, 1]).r2:.3f}"
        )
    print(f"degree-4 fit of output change (highest power first), R^2 {fit.r2:.4f}:")
    print("  " + json.dumps([round(c, 8) for c in fit.coefficients]))
    if calibration.scores:
        print(
            f"validation on {calibration.validation_prompts} other prompts, mean PSNR at {VALIDATION_SPEEDUPS}x "
            "fewer block evaluations, by shrinkage towards the mean: "
            + ", ".join(f"{name}: {value:.2f} dB" for name, value in calibration.scores.items())
        )
    print(
        f"coefficients (shrinkage {calibration.shrinkage:g}): "
        + json.dumps([round(c, 8) for c in calibration.coefficients])
    )


def profile(engine: AsyncEngine, calibration: Calibration, prompts: list[str], seeds, params) -> dict:
    fit = calibration.fit
    return {
        "model": engine.model.name,
        "transformer": type(engine.model.pipeline.transformer).__name__,
        "num_inference_steps": engine.prepare(prompts[0], params).num_inference_steps,
        "prompts": len(prompts),
        "seeds": list(seeds),
        "branches": sorted(calibration.pairs),
        "coefficients": calibration.coefficients,
        "fit_coefficients": fit.coefficients,
        "shrinkage": calibration.shrinkage,
        "validation": {"prompts": calibration.validation_prompts, "psnr_by_shrinkage": calibration.scores},
        "r2": fit.r2,
        "points": fit.points,
        "x_range": list(fit.x_range),
        "y_range": list(fit.y_range),
    }


def run(args: argparse.Namespace) -> int:
    params = sweep_params(args)
    engine = AsyncEngine(args.model, cache_backend="tea_cache", device=args.device, dtype=args.dtype)
    started = time.perf_counter()
    try:
        candidates, _ = model_prompts(args, engine.model.name, held_out=False)
        count = args.num_prompts or min(16, len(candidates))
        if len(candidates) < count + args.validate:
            raise ValueError(
                f"{count} calibration prompts and {args.validate} validation prompts need {count + args.validate} "
                f"prompts, there are {len(candidates)}: give more with --prompts FILE (one per line)"
            )
        prompts, validation = candidates[:count], candidates[count : count + args.validate]
        calibration = calibrate(engine, prompts, validation, args.seeds, params)
    finally:
        engine.shutdown()
    print(
        f"model {engine.model.name} ({type(engine.model.pipeline.transformer).__name__}): {len(prompts)} prompts x "
        f"{len(args.seeds)} seeds, {time.perf_counter() - started:.0f} s"
    )
    report(calibration)
    output_path = Path(args.output)
    output_path.write_text(json.dumps(profile(engine, calibration, prompts, args.seeds, params), indent=2) + "\n")
    print(f'wrote {output_path}; use it with --cache-config \'{{"coefficients_file": "{output_path}"}}\'')
    return 0
