"""`teaserve calibrate`: fit TeaCache's rescaling polynomial to a model over several step counts and write a
profile that `--cache-config '{"coefficients_file": PROFILE}'` loads (the logic: `teaserve.evaluation.calibration`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..evaluation.calibration import calibrate, profile, report
from ..evaluation.prompts import model_prompts
from ..evaluation.sweeps import CALIBRATION_PROMPTS
from ..pipelines import load_model
from .bench import sweep_params


def run(args: argparse.Namespace) -> int:
    params = sweep_params(args)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    started = time.perf_counter()
    candidates, _ = model_prompts(model.name, held_out=False, prompts_file=args.prompts)
    count = args.num_prompts or min(CALIBRATION_PROMPTS, len(candidates))
    if len(candidates) < count + args.validate:
        raise ValueError(
            f"{count} calibration prompts and {args.validate} validation prompts need {count + args.validate} "
            f"prompts, there are {len(candidates)}: give more with --prompts FILE (one per line)"
        )
    prompts, validation = candidates[:count], candidates[count : count + args.validate]
    calibration = calibrate(
        model, prompts, validation, args.seeds, params, args.steps, log=lambda m: print(m, file=sys.stderr)
    )
    print(
        f"model {model.name} ({type(model.pipeline.transformer).__name__}): {len(prompts)} prompts x "
        f"{len(args.seeds)} seeds x {len(args.steps)} step counts, {time.perf_counter() - started:.0f} s"
    )
    print("\n".join(report(calibration)))
    output_path = Path(args.output)
    output_path.write_text(json.dumps(profile(model, calibration, prompts, args.seeds), indent=2) + "\n")
    print(f'wrote {output_path}; use it with --cache-config \'{{"coefficients_file": "{output_path}"}}\'')
    return 0
