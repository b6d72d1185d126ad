"""`teaserve calibrate`: fit cache backends to a model over several step counts, measure their quality tables, and
write one profile that `--cache-profile PROFILE` loads (the logic: `teaserve.evaluation.calibration`). TeaCache's
coefficients also load with `--cache-config '{"coefficients_file": PROFILE}'`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..evaluation.calibration import calibrate
from ..evaluation.prompts import model_prompts
from ..evaluation.sweeps import CALIBRATION_PROMPTS
from ..pipelines import load_model
from .bench import log, sweep_params


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
    calibration = calibrate(model, args.backend, prompts, validation, args.seeds, params, args.steps, log=log)
    print(
        f"model {model.name} ({calibration.transformer}): {len(prompts)} prompts x {len(args.seeds)} seeds x "
        f"{len(args.steps)} step counts, {time.perf_counter() - started:.0f} s"
    )
    print("\n".join(calibration.report()))
    output_path = Path(args.output)
    output_path.write_text(json.dumps(calibration.profile(), indent=2) + "\n")
    print(f"wrote {output_path}; serve with it: --cache-profile {output_path}")
    return 0
