"""Realized against ideal TeaCache speedup on a transformer-dominated random Qwen-Image.

Ideal speedup = block-stack evaluations uncached / cached (what free gates and free skips would give); realized
= measured time uncached / cached in the same run. Their ratio shows what the cache's own machinery costs
(gate signal, hooks, host syncs). The model: 16 transformer layers of width 192 on 1024 image tokens
(256x256 pixels), a small VAE, no CFG, so that the block stack dominates the run.

Two measurements, in one run:
- the bench table: summed times of whole requests, end to end and inside the transformer. On a shared CPU a
  computed step's time wanders by 10-20% from step to step, and a cached request at a high threshold computes
  only 2-3 steps, so these ratios carry that noise.
- per transformer call: the median time of a computed call and of a skipped call (each call is classified by
  the cache's own schedule). What the machinery costs is the skipped call's time; with it the realized
  transformer speedup of a schedule of C computed and S skipped steps is (C + S) / (C + S * skipped/computed).

    python benchmarks/teacache_speedup.py [--steps 20] [--prompts 4] [--layers 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from teaserve.cli.main import quiet_libraries
from teaserve.engine import AsyncEngine, OmniDiffusionSamplingParams
from teaserve.evaluation.bench import format_table, run_bench
from teaserve.evaluation.prompts import GENERIC_PROMPTS
from teaserve.evaluation.sweeps import Variant
from teaserve.pipelines.testing import build_tiny_qwen_image


class CallTimer:
    """Times every forward of a module (the engine runs one request at a time, so calls never overlap)."""

    def __init__(self, module):
        self.seconds: list[float] = []
        module.register_forward_pre_hook(lambda *_: self.seconds.append(-time.perf_counter()))
        module.register_forward_hook(lambda *_: self._end())

    def _end(self) -> None:
        self.seconds[-1] += time.perf_counter()


def per_call_costs(engine: AsyncEngine, prompts, params, thresholds) -> tuple[float, float, dict[float, list[str]]]:
    """Median computed and skipped transformer call, and each threshold's schedules (one per prompt)."""
    timer = CallTimer(engine.model.pipeline.transformer)
    computed, skipped, schedules = [], [], {}
    for threshold in thresholds:
        for prompt in prompts:
            timer.seconds.clear()
            request = engine.prepare(prompt, params.replace(cache_config={"rel_l1_thresh": threshold}))
            output = engine.submit(request, block=True).result()
            (branch,) = output.metrics.cache["branches"].values()  # no CFG: one branch, one call per step
            schedules.setdefault(threshold, []).append(branch["schedule"])
            for letter, seconds in zip(branch["schedule"], timer.seconds, strict=True):
                (computed if letter == "C" else skipped).append(seconds)
    return statistics.median(computed), statistics.median(skipped), schedules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--thresholds", default="0.2,0.4,0.6,0.8")
    args = parser.parse_args()
    quiet_libraries()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    prompts = GENERIC_PROMPTS[: args.prompts]
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_qwen_image(folder, num_layers=args.layers, num_attention_heads=12, vae_base_dim=8)
        engine = AsyncEngine(folder, cache_backend="tea_cache", profile=True)
        params = OmniDiffusionSamplingParams(num_inference_steps=args.steps, width=256, height=256, true_cfg_scale=1.0)
        request = engine.prepare("x", params)
        transformer = engine.model.pipeline.transformer
        tokens = (request.width // 8) * (request.height // 8)
        print(
            f"transformer: {args.layers} layers, width {transformer.inner_dim}, {tokens} image tokens, "
            f"{sum(p.numel() for p in transformer.parameters()) / 1e6:.1f}M parameters; {args.steps} steps, no CFG"
        )
        variants = [Variant("tea_cache", "tea_cache")]
        rows = run_bench(engine, prompts, [0], [args.steps], variants, values={"tea_cache": thresholds}, params=params)
        computed_call, skipped_call, schedules = per_call_costs(engine, prompts, params, thresholds)
        engine.shutdown()
    print(format_table(rows))
    print("\nrealized / ideal speedup, summed request times (end to end; transformer time only):")
    for row in rows[1:]:
        print(
            f"  threshold {row.label}: ideal {row.ideal_speedup:.2f}x, realized {row.speedup:.2f}x -> "
            f"{row.realized_over_ideal:.3f}; transformer {row.transformer_speedup:.2f}x -> "
            f"{row.transformer_realized_over_ideal:.3f}"
        )
    ratio = skipped_call / computed_call
    print(
        f"\nper transformer call (medians): computed {1000 * computed_call:.1f} ms, "
        f"skipped {1000 * skipped_call:.2f} ms ({100 * ratio:.2f}% of a computed call)"
    )
    for threshold, threshold_schedules in schedules.items():
        steps = sum(len(schedule) for schedule in threshold_schedules)
        computed_steps = sum(schedule.count("C") for schedule in threshold_schedules)
        ideal = steps / computed_steps
        realized = steps / (computed_steps + (steps - computed_steps) * ratio)
        print(
            f"  threshold {threshold:g}: ideal {ideal:.2f}x, realized {realized:.2f}x -> {realized / ideal:.3f} "
            f"(schedules {', '.join(sorted(set(threshold_schedules)))})"
        )


if __name__ == "__main__":
    main()
