"""`teaserve calibrate`: fit TeaCache's rescaling polynomial to a model.

Runs prompts uncached while recording, per step and per CFG branch, the relative L1 change of the gate signal
(the timestep-modulated input of the first block) and of the block stack's output; fits output change as a
degree-4 polynomial of gate change over all steps after the first, prints the fit and writes a profile that
`--cache-config '{"coefficients_file": PROFILE}'` loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine import AsyncEngine, OmniDiffusionSamplingParams
from ..engine.params import parse_size
from .bench import model_prompts


@dataclass
class Fit:
    coefficients: list[float]
    r2: float
    points: int
    x_range: tuple[float, float]
    y_range: tuple[float, float]


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
    )


def collect_pairs(cache_stats: dict) -> dict[str, list[tuple[float, float]]]:
    """(gate change, output change) per branch for every step where both are known."""
    return {
        name: [(x, y) for x, y in zip(branch["rel_l1"], branch["output_rel_l1"], strict=True) if None not in (x, y)]
        for name, branch in cache_stats["branches"].items()
    }


def run(args: argparse.Namespace) -> int:
    prompts, _ = model_prompts(args, held_out=False)
    width, height = parse_size(args.size) if args.size else (None, None)
    engine = AsyncEngine(args.model, cache_backend="tea_cache", device=args.device, dtype=args.dtype)
    engine.cache.record_outputs()
    pairs: dict[str, list[tuple[float, float]]] = {}
    started = time.perf_counter()
    try:
        for index, prompt in enumerate(prompts):
            for seed in args.seeds:
                params = OmniDiffusionSamplingParams(
                    num_inference_steps=args.steps, width=width, height=height, seed=seed,
                    true_cfg_scale=args.true_cfg_scale,
                )  # fmt: skip
                output = engine.submit(engine.prepare(prompt, params), block=True).result()
                for branch, branch_pairs in collect_pairs(output.metrics.cache).items():
                    pairs.setdefault(branch, []).extend(branch_pairs)
            print(f"prompt {index + 1}/{len(prompts)} recorded", file=sys.stderr)
    finally:
        engine.shutdown()
    everything = np.array([pair for branch in pairs.values() for pair in branch])
    fit = fit_polynomial(everything[:, 0], everything[:, 1])
    transformer = type(engine.model.pipeline.transformer).__name__
    print(
        f"model {engine.model.name} ({transformer}): {len(prompts)} prompts x {len(args.seeds)} seeds, "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(
        f"{fit.points} points (all branches), gate change x in [{fit.x_range[0]:.4g}, {fit.x_range[1]:.4g}], "
        f"output change y in [{fit.y_range[0]:.4g}, {fit.y_range[1]:.4g}]"
    )
    for branch, branch_pairs in pairs.items():
        values = np.array(branch_pairs)
        branch_fit = fit_polynomial(values[:, 0], values[:, 1])
        print(f"  branch {branch}: {branch_fit.points} points, R^2 of its own fit {branch_fit.r2:.3f}")
    print(f"degree-4 fit (highest power first), R^2 {fit.r2:.4f}:")
    print("  " + json.dumps([round(c, 8) for c in fit.coefficients]))
    profile = {
        "model": engine.model.name,
        "transformer": transformer,
        "num_inference_steps": engine.prepare(
            prompts[0], OmniDiffusionSamplingParams(num_inference_steps=args.steps)
        ).num_inference_steps,
        "prompts": len(prompts),
        "seeds": list(args.seeds),
        "branches": sorted(pairs),
        "coefficients": fit.coefficients,
        "r2": fit.r2,
        "points": fit.points,
        "x_range": list(fit.x_range),
        "y_range": list(fit.y_range),
    }
    output_path = Path(args.output)
    output_path.write_text(json.dumps(profile, indent=2) + "\n")
    print(f'wrote {output_path}; use it with --cache-config \'{{"coefficients_file": "{output_path}"}}\'')
    return 0
