"""`teaserve train-default-video`: retrain the embedded video model `teaserve/shapes-wan` from scratch, calibrate
TeaCache for it, evaluate.

teaserve train-default-video --out shapes-wan   # trains on 2 CPU cores, calibrates, evaluates on held-out captions
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ..pipelines.default_video_model import clips
from ..pipelines.default_video_model.evaluate import evaluate, sample_sheet
from ..pipelines.default_video_model.train import TrainingConfig, train
from .train_default import calibrate_teacache

CALIBRATION_SEEDS, CALIBRATION_STEPS = (0,), (10, 25, 50)
"""Fewer than the image model's: a 17-frame clip costs several of its images."""


def run(args: argparse.Namespace) -> int:
    config = dataclasses.replace(TrainingConfig(), seed=args.seed).scaled(args.scale)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.0f}s {message}", file=sys.stderr, flush=True)

    folder = Path(train(config, args.out, log=log))
    captions = [clip.caption for clip in clips.split_clips()[0]]
    calibrate_teacache(
        folder,
        captions[: args.calibration_prompts],
        captions[args.calibration_prompts : args.calibration_prompts + args.calibration_prompts // 2],
        CALIBRATION_SEEDS,
        CALIBRATION_STEPS,
        log,
    )
    log("evaluating on held-out captions")
    _, held_out = clips.split_clips()
    evaluation = evaluate(folder, held_out[: args.evaluate])
    accuracy = evaluation.accuracy()
    print(
        f"held-out captions ({len(evaluation.clips)}), default sampling: "
        + ", ".join(f"{name} {100 * value:.1f}%" for name, value in accuracy.items())
    )
    (folder / "evaluation.json").write_text(
        json.dumps({"held_out": len(evaluation.clips), **accuracy}, indent=2) + "\n"
    )
    sample_sheet(evaluation, folder / "samples.png")
    print(
        f"wrote {folder} (teaserve.json with calibrated TeaCache coefficients and quality table, samples.png, "
        "evaluation.json)"
    )
    return 0
