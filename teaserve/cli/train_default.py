"""`teaserve train-default`: retrain the embedded shapes model from scratch, calibrate TeaCache for it, evaluate.

teaserve train-default --out shapes-model   # about 50 minutes of training on 2 CPU cores, then a few more
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..cache import TeaCacheBackend
from ..engine import OmniDiffusionSamplingParams
from ..evaluation.calibration import calibrate
from ..evaluation.sweeps import CALIBRATION_PROMPTS, CALIBRATION_STEPS
from ..pipelines import load_model
from ..pipelines.default_model import shapes
from ..pipelines.default_model.evaluate import evaluate, sample_grid
from ..pipelines.default_model.train import TrainingConfig, train
from ..pipelines.loading import MODEL_PROFILE_FILE

VALIDATION_PROMPTS, CALIBRATION_SEEDS = 8, (0, 1)


def run(args: argparse.Namespace) -> int:
    config = dataclasses.replace(TrainingConfig(), seed=args.seed).scaled(args.scale)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.0f}s {message}", file=sys.stderr, flush=True)

    folder = Path(train(config, args.out, log=log))
    calibrate_and_evaluate(folder, args.evaluate, log)
    return 0


def calibrate_and_evaluate(folder: Path, evaluate_count: int, log: Callable[[str], None]) -> None:
    """Fit TeaCache's coefficients to a trained shapes model and measure its quality table (into its
    teaserve.json), then check it on held-out captions (evaluation.json, samples.png)."""
    captions = [scene.caption for scene in shapes.split_scenes()[0]]
    calibrate_teacache(
        folder,
        captions[:CALIBRATION_PROMPTS],
        captions[CALIBRATION_PROMPTS : CALIBRATION_PROMPTS + VALIDATION_PROMPTS],
        CALIBRATION_SEEDS,
        CALIBRATION_STEPS,
        log,
    )
    log("evaluating on held-out captions")
    _, held_out = shapes.split_scenes()
    evaluation = evaluate(folder, held_out[:evaluate_count])
    sample_grid(evaluation, folder / "samples.png")
    write_evaluation(folder, len(evaluation.scenes), evaluation.accuracy())


def write_evaluation(folder: Path, held_out: int, accuracy: dict[str, float]) -> None:
    """Print a trained model's accuracy on `held_out` captions, record it in its evaluation.json and say what the
    folder now holds."""
    print(
        f"held-out captions ({held_out}), default sampling: "
        + ", ".join(f"{name} {100 * value:.1f}%" for name, value in accuracy.items())
    )
    (folder / "evaluation.json").write_text(json.dumps({"held_out": held_out, **accuracy}, indent=2) + "\n")
    print(
        f"wrote {folder} (teaserve.json with calibrated TeaCache coefficients and quality table, samples.png, "
        "evaluation.json)"
    )


def calibrate_teacache(
    folder: Path,
    prompts: Sequence[str],
    validation_prompts: Sequence[str],
    seeds: Sequence[int],
    step_counts: Sequence[int],
    log: Callable[[str], None],
) -> None:
    """Calibrate TeaCache on a trained model folder with its default sampling: the whole record into
    teacache-profile.json, the coefficients and quality table into its teaserve.json."""
    log("calibrating TeaCache on training captions")
    calibration = calibrate(
        load_model(str(folder)),
        [TeaCacheBackend.name],
        prompts,
        validation_prompts,
        seeds,
        OmniDiffusionSamplingParams(),
        step_counts,
        log,
    )
    record = calibration.profile()
    print("\n".join(calibration.report()))
    (folder / "teacache-profile.json").write_text(json.dumps(record, indent=2) + "\n")
    model_profile = json.loads((folder / MODEL_PROFILE_FILE).read_text())
    model_profile["cache"] = record["cache"]
    (folder / MODEL_PROFILE_FILE).write_text(json.dumps(model_profile, indent=2) + "\n")
