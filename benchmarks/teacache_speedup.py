"""Realized against ideal TeaCache speedup on a transformer-dominated random Qwen-Image.

Ideal speedup = block-stack evaluations uncached / cached (what free gates and free skips would give); realized
= measured time uncached / cached in the same run. Their ratio shows what the cache's own machinery costs
(gate signal, hooks, host syncs). The model: 16 transformer layers of width 192 on 1024 image tokens
(256x256 pixels), a small VAE, no CFG, so that the block stack dominates the run.

    python benchmarks/teacache_speedup.py [--steps 20] [--prompts 2] [--layers 16]
"""

from __future__ import annotations

import argparse
import tempfile

from teaserve.cli.bench import GENERIC_PROMPTS, format_table, run_bench
from teaserve.cli.main import quiet_libraries
from teaserve.engine import AsyncEngine, OmniDiffusionSamplingParams
from teaserve.pipelines.testing import build_tiny_qwen_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--thresholds", default="0.2,0.4,0.6,0.8")
    args = parser.parse_args()
    quiet_libraries()
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
        thresholds = [float(t) for t in args.thresholds.split(",")]
        rows = run_bench(engine, GENERIC_PROMPTS[: args.prompts], [0], thresholds, params=params)
        engine.shutdown()
    print(format_table(rows))
    print("\nrealized / ideal speedup (end to end; transformer time only):")
    for row in rows[1:]:
        print(
            f"  threshold {row.threshold:g}: ideal {row.ideal_speedup:.2f}x, realized {row.speedup:.2f}x -> "
            f"{row.realized_over_ideal:.3f}; transformer {row.transformer_speedup:.2f}x -> "
            f"{row.transformer_realized_over_ideal:.3f}"
        )


if __name__ == "__main__":
    main()
