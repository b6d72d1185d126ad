"""`teaserve train-default`: retrain the embedded shapes model from scratch, then evaluate it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ..pipelines.default_model import shapes
from ..pipelines.default_model.evaluate import evaluate, sample_grid
from ..pipelines.default_model.train import TrainingConfig, train


def run(args: argparse.Namespace) -> int:
    config = dataclasses.replace(TrainingConfig(), seed=args.seed).scaled(args.scale)
    started = time.perf_counter()
    folder = train(
        config,
        args.out,
        log=lambda message: print(f"{time.perf_counter() - started:7.0f}s {message}", file=sys.stderr, flush=True),
    )
    _, held_out = shapes.split_scenes()
    evaluation = evaluate(folder, held_out[: args.evaluate])
    accuracy = evaluation.accuracy()
    print(
        f"held-out captions ({len(evaluation.scenes)}), default sampling: "
        + ", ".join(f"{name} {100 * value:.1f}%" for name, value in accuracy.items())
    )
    (Path(folder) / "evaluation.json").write_text(
        json.dumps({"held_out": len(evaluation.scenes), **accuracy}, indent=2) + "\n"
    )
    sample_grid(
        dataclasses.replace(
            evaluation, scenes=evaluation.scenes[:32], images=evaluation.images[:32], checks=evaluation.checks[:32]
        ),
        Path(folder) / "samples.png",
    )
    print(f"wrote {folder} (samples.png, evaluation.json)")
    return 0
