"""`teaserve bench`: cached against uncached, side by side in one run (the logic: `teaserve.evaluation.bench`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..engine import AsyncEngine, OmniDiffusionSamplingParams
from ..engine.params import parse_size
from ..evaluation.bench import format_table, plot, rows_as_json, run_bench
from ..evaluation.prompts import model_prompts
from ..evaluation.sweeps import Variant


def sweep_params(args: argparse.Namespace, steps: int | None = None) -> OmniDiffusionSamplingParams:
    """The sampling of a bench or calibration sweep: the model's defaults unless the flags say otherwise."""
    width, height = parse_size(args.size) if args.size else (None, None)
    return OmniDiffusionSamplingParams(
        num_inference_steps=steps, width=width, height=height, true_cfg_scale=args.true_cfg_scale
    )


def run(args: argparse.Namespace) -> int:
    params = sweep_params(args, args.steps)
    engine = AsyncEngine(
        args.model,
        cache_backend=args.cache_backend or "tea_cache",
        cache_config=args.cache_config,
        device=args.device,
        dtype=args.dtype,
        profile=True,
    )
    started = time.perf_counter()
    try:
        prompts, checker = model_prompts(engine.model.name, held_out=True, prompts_file=args.prompts)
        prompts = prompts[: args.num_prompts or 32]
        rows = run_bench(
            engine,
            prompts,
            args.seeds,
            args.thresholds,
            variants=args.variant or [Variant(engine.cache.name)],
            params=params,
            checker=checker,
            warmup=args.warmup,
            log=lambda m: print(m, file=sys.stderr),
        )
        request = engine.prepare(prompts[0], params)
    finally:
        engine.shutdown()
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
