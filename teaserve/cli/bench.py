"""`teaserve bench`: cache backends against uncached, side by side in one run (the logic:
`teaserve.evaluation.bench`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..cache import resolve_backend_name
from ..engine import AsyncEngine, OmniDiffusionSamplingParams
from ..engine.params import parse_size
from ..evaluation.backends import sweep_backends
from ..evaluation.bench import format_speedups_at, format_table, frontiers, plot, rows_as_json, run_bench
from ..evaluation.prompts import model_prompts
from ..evaluation.sweeps import Variant


def sweep_params(args: argparse.Namespace) -> OmniDiffusionSamplingParams:
    """The sampling of a bench or calibration sweep: the model's defaults unless the flags say otherwise."""
    width, height = parse_size(args.size) if args.size else (None, None)
    return OmniDiffusionSamplingParams(width=width, height=height, true_cfg_scale=args.true_cfg_scale)


def log(message: str) -> None:
    print(message, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    params = sweep_params(args)
    values = {resolve_backend_name(name): backend_values for name, backend_values in args.values}
    engine = AsyncEngine(
        args.model,
        cache_backend="none",
        cache_profile=args.cache_profile,
        device=args.device,
        dtype=args.dtype,
        profile=True,
    )
    started = time.perf_counter()
    try:
        steps = args.steps or [engine.model.defaults.num_inference_steps]
        # Every backend that works here, unless the user names backends or brings variants of their own.
        backends = [] if args.backends is None and args.variant else args.backends
        variants = [Variant(name, name) for name in sweep_backends(engine, backends, apply=True, log=log)]
        variants += args.variant
        if not variants:
            raise ValueError("no cache backend to compare: name some with --backends or --variant")
        prompts, checker = model_prompts(engine.model.name, held_out=True, prompts_file=args.prompts)
        prompts = prompts[: args.num_prompts or 32]
        rows = run_bench(
            engine,
            prompts,
            args.seeds,
            steps,
            variants,
            values=values,
            quality_targets=args.quality_targets,
            params=params,
            checker=checker,
            warmup=args.warmup,
            log=log,
        )
        request = engine.prepare(prompts[0], params)
    finally:
        engine.shutdown()
    print(
        f"model {engine.model.name}: {len(prompts)} prompts x {len(args.seeds)} seeds at {','.join(map(str, steps))} "
        f"steps, {request.width}x{request.height}, true CFG {request.true_cfg_scale:g} "
        f"({time.perf_counter() - started:.0f} s)"
    )
    print(format_table(rows))
    print()
    print(format_speedups_at(frontiers(rows)))
    context = {
        "model": engine.model.name,
        "prompts": len(prompts),
        "seeds": list(args.seeds),
        "steps": steps,
        "size": f"{request.width}x{request.height}",
        "true_cfg_scale": request.true_cfg_scale,
        "cache_profile": None if args.cache_profile is None else str(args.cache_profile),
    }
    if args.json:
        Path(args.json).write_text(rows_as_json(rows, **context) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, f"cache backends on {engine.model.name}")
        print(f"wrote {args.plot}")
    return 0
