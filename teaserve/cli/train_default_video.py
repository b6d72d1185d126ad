"""`teaserve train-default-video`: retrain the embedded video model `teaserve/shapes-wan` from scratch, calibrate
TeaCache for it, evaluate.

teaserve train-default-video --out shapes-wan   # trains on 2 CPU cores, calibrates, evaluates on held-out captions
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from ..pipelines.default_video_model import clips
from ..pipelines.default_video_model.evaluate import evaluate, sample_sheet
from ..pipelines.default_video_model.train import TrainingConfig, train
from .train_default import calibrate_teacache, write_evaluation

CALIBRATION_SEEDS, CALIBRATION_STEPS = (0,), (10, 25, 50)
"""Fewer than the image model's: a 17-frame clip costs several of its images."""


def run(args: argparse.Namespace) -> int:
    config = dataclasses.replace(TrainingConfig(), seed=args.seed).scaled(args.scale)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.0f}s {message}", file=sys.stderr, flush=True)

    folder = Path(train(config, args.out, log=log))
    training, held_out = clips.split_clips()
    captions = [clip.caption for clip in training]
    calibrate_teacache(
        folder,
        captions[: args.calibration_prompts],
        captions[args.calibration_prompts : args.calibration_prompts + args.calibration_prompts // 2],
        CALIBRATION_SEEDS,
        CALIBRATION_STEPS,
        log,
    )
    log("evaluating on held-out captions")
    evaluation = evaluate(folder, held_out[: args.evaluate])
    sample_sheet(evaluation, folder / "samples.png")
    write_evaluation(folder, len(evaluation.clips), evaluation.accuracy())
    return 0
