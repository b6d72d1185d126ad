"""`teaserve bench`: one run, uncached and cached side by side, quality against the uncached twin."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from teaserve.engine import AsyncEngine, OmniDiffusionSamplingParams
from teaserve.evaluation.bench import run_bench
from teaserve.evaluation.metrics import PSNR_CAP_DB, psnr, ssim
from teaserve.evaluation.sweeps import Variant


def test_psnr_is_float64_and_capped():
    black = Image.new("RGB", (8, 8), (0, 0, 0))
    one_off = Image.new("RGB", (8, 8), (1, 1, 1))
    assert psnr(black, black) == PSNR_CAP_DB
    assert psnr(one_off, black) == pytest.approx(20 * 2.406540180433955)  # 10 log10(255^2 / 1)
    assert ssim(black, black) == pytest.approx(1.0)


def test_run_bench_counts_block_stack_evaluations(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen), cache_backend="tea_cache", profile=True)
    try:
        params = OmniDiffusionSamplingParams(num_inference_steps=10)
        rows = run_bench(
            engine,
            ["a cat", "a dog"],
            [0, 1],
            [1e-9, 1e9],
            params=params,
            variants=[Variant("qwen"), Variant("identity", {"coefficients": [0, 0, 0, 1, 0]})],
            checker=lambda prompt, image: image.size == (32, 32),
        )
    finally:
        engine.shutdown()
    uncached, qwen_never, qwen_huge, identity_never, identity_huge = rows
    assert identity_never.block_stack_evaluations == 20
    assert uncached.threshold is None and uncached.requests == 4
    assert uncached.block_stack_evaluations == 20  # 10 steps x (cond + uncond)
    assert qwen_never.block_stack_evaluations == 20 and qwen_never.psnr_mean == PSNR_CAP_DB
    assert qwen_huge.block_stack_evaluations == 4 and qwen_huge.ideal_speedup == pytest.approx(5.0)
    assert identity_huge.variant == "identity" and identity_huge.ideal_speedup == pytest.approx(5.0)
    assert qwen_huge.psnr_mean < PSNR_CAP_DB and 0 < qwen_huge.ssim_mean < 1
    assert uncached.transformer_seconds > 0 and qwen_huge.caption_accuracy == 1.0
    assert engine.cache.settings == {}  # the variants' coefficients were server settings for the run only


def test_bench_command_prints_the_table_and_writes_json(tmp_path, tiny_qwen):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "teaserve",
            "bench",
            str(tiny_qwen),
            "--thresholds",
            "0.2,1e9",
            "--num-prompts",
            "1",
            "--steps",
            "6",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "real/ideal" in result.stdout and "tea_cache" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["threshold"] for row in rows] == [None, 0.2, 1e9]
    assert rows[2]["block_stack_evaluations"] == 4
