"""`teaserve bench`: one run, uncached and every backend side by side, quality against the uncached twin."""

import json

import pytest
from fake_backends import ScaledOutput
from PIL import Image

from teaserve.cache import CACHE_BACKENDS
from teaserve.cli.args import build_parser
from teaserve.cli.main import main
from teaserve.engine import AsyncEngine
from teaserve.evaluation.bench import Frontier, FrontierPoint, frontiers, pareto_frontier, run_bench
from teaserve.evaluation.metrics import PSNR_CAP_DB, psnr, ssim
from teaserve.evaluation.sweeps import Variant, tuning_grid


def test_psnr_is_float64_and_capped():
    black = Image.new("RGB", (8, 8), (0, 0, 0))
    one_off = Image.new("RGB", (8, 8), (1, 1, 1))
    assert psnr(black, black) == PSNR_CAP_DB
    assert psnr(one_off, black) == pytest.approx(20 * 2.406540180433955)  # 10 log10(255^2 / 1)
    assert ssim(black, black) == pytest.approx(1.0)


@pytest.fixture
def scaled_output(monkeypatch):
    monkeypatch.setitem(CACHE_BACKENDS, ScaledOutput.name, ScaledOutput)


@pytest.fixture(scope="module")
def engine(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen), profile=True)
    yield engine
    engine.shutdown()


def test_run_bench_counts_block_stack_evaluations(engine):
    rows = run_bench(
        engine,
        ["a cat", "a dog"],
        [0, 1],
        [10],
        [Variant("qwen", "tea_cache"), Variant("identity", "tea_cache", {"coefficients": [0, 0, 0, 1, 0]})],
        values={"tea_cache": [1e-9, 1e9]},
        checker=lambda prompt, image: image.size == (32, 32),
    )
    uncached, qwen_never, qwen_huge, identity_never, identity_huge = rows
    assert identity_never.block_stack_evaluations == 20
    assert uncached.setting == {} and uncached.requests == 4 and uncached.backend == "none"
    assert uncached.block_stack_evaluations == 20  # 10 steps x (cond + uncond)
    assert qwen_never.block_stack_evaluations == 20 and qwen_never.psnr_mean == PSNR_CAP_DB
    assert qwen_huge.setting == {"rel_l1_thresh": 1e9} and qwen_huge.steps == 10
    assert qwen_huge.block_stack_evaluations == 4 and qwen_huge.ideal_speedup == pytest.approx(5.0)
    assert identity_huge.variant == "identity" and identity_huge.ideal_speedup == pytest.approx(5.0)
    assert qwen_huge.psnr_mean < PSNR_CAP_DB and 0 < qwen_huge.ssim_mean < 1
    assert uncached.transformer_seconds > 0 and qwen_huge.caption_accuracy == 1.0
    assert engine.cache_backend_name == "none"  # the engine's own backend is back


def test_backends_side_by_side_at_several_step_counts_with_quality_targets(engine, scaled_output):
    table = {"4": [[0.0, 100.0], [0.5, 25.0]], "6": [[0.0, 100.0], [0.5, 25.0]]}
    rows = run_bench(
        engine,
        ["a cat"],
        [0],
        [4, 6],
        [Variant("tea_cache", "tea_cache"), Variant("scaled", "scaled_output", {"quality_table": table})],
        values={"tea_cache": [1e9], "scaled_output": [0.0, 0.5]},
        quality_targets=[40, 20],
    )
    assert [(row.steps, row.variant, row.label) for row in rows] == [
        (steps, variant, label)
        for steps in (4, 6)
        for variant, label in [
            ("uncached", "-"),
            ("tea_cache", "1e+09"),  # no quality table: no quality-target rows
            ("scaled", "0"),
            ("scaled", "0.5"),
            ("scaled", "40 dB"),
            ("scaled", "20 dB"),
        ]
    ]
    by_key = {(row.steps, row.variant, row.label): row for row in rows}
    for steps in (4, 6):
        assert by_key[steps, "tea_cache", "1e+09"].block_stack_evaluations == 4  # first and last, two branches
        # Scale 0: the uncached image, up to float rounding (this backend keeps no per-row state, so it runs the
        # diffusers pipeline while the uncached twin runs the batched loop).
        assert by_key[steps, "scaled", "0"].psnr_mean > 70
        at_40, at_20 = by_key[steps, "scaled", "40 dB"], by_key[steps, "scaled", "20 dB"]
        assert at_40.psnr_mean > 70 and at_40.meets_target is True  # the table chose scale 0
        assert at_20.psnr_mean == by_key[steps, "scaled", "0.5"].psnr_mean < 40  # it chose 0.5, the same image
        assert at_20.meets_target is (at_20.psnr_mean >= 19) and by_key[steps, "scaled", "0.5"].meets_target is None
    fronts = {(front.variant, front.steps): front for front in frontiers(rows)}
    assert sorted(fronts) == [("scaled", 4), ("scaled", 6), ("tea_cache", 4), ("tea_cache", 6)]
    assert all(front.points[0].psnr_db == PSNR_CAP_DB for front in fronts.values())


def test_bad_sweep_settings_are_refused_before_anything_runs(engine):
    with pytest.raises(ValueError, match="rel_l1_thresh must be a number"):
        run_bench(engine, ["x"], [0], [4], [Variant("t", "tea_cache")], values={"tea_cache": [-1]})
    with pytest.raises(ValueError, match="valid keys"):
        run_bench(engine, ["x"], [0], [4], [Variant("t", "tea_cache", {"speed": 1})])
    with pytest.raises(ValueError, match="no tuning key"):
        run_bench(engine, ["x"], [0], [4], [Variant("n", "none")])
    with pytest.raises(ValueError, match="tuning values for scaled_output, which no variant runs"):
        run_bench(engine, ["x"], [0], [4], [Variant("t", "tea_cache")], values={"scaled_output": [0.1]})


def point(speedup, psnr_db, value=None):
    return FrontierPoint(speedup, psnr_db, {} if value is None else {"v": value})


def test_the_frontier_keeps_the_points_nothing_beats():
    points = [point(1.0, PSNR_CAP_DB), point(0.9, 60, 1), point(2, 44, 2), point(1.8, 40, 3), point(3, 30, 4)]
    assert pareto_frontier(points) == [point(1.0, PSNR_CAP_DB), point(2, 44, 2), point(3, 30, 4)]
    front = Frontier("v", "b", 10, pareto_frontier(points))
    assert front.speedup_at(44) == 2 and front.speedup_at(45) is None  # only uncached reaches 45 dB
    assert front.speedup_at(37) == pytest.approx(2.5) and front.speedup_at(30) == 3 and front.speedup_at(20) == 3
    # A cached point with identical images: its speedup, no interpolation from the capped PSNR.
    identical = Frontier("v", "b", 10, pareto_frontier([point(1.0, PSNR_CAP_DB), point(1.2, PSNR_CAP_DB, 0)]))
    assert identical.points == [point(1.2, PSNR_CAP_DB, 0)] and identical.speedup_at(40) == 1.2
    assert Frontier("v", "b", 10, [point(1.0, PSNR_CAP_DB), point(2, 30, 1)]).speedup_at(35) is None


def test_the_tuning_grid_adds_midpoints_and_one_value_beyond_each_end():
    assert tuning_grid((0.1, 0.2, 0.4)) == [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6]
    assert tuning_grid((0.0, 0.02)) == [0.0, 0.01, 0.02, 0.04]  # nothing below never-skip
    assert tuning_grid((2, 3, 5)) == [1, 2, 3, 4, 5, 7] and tuning_grid(()) == []


def test_bench_command_prints_the_tables_and_writes_json(tmp_path, tiny_qwen, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", str(tiny_qwen), "--backends", "tea_cache", "--values", "tea_cache=0.2,1e9", "--num-prompts", "1"]
    argv += ["--steps", "4,6"]
    assert main([*argv, "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "real/ideal" in stdout and "tea_cache" in stdout
    assert "speedup at 35/40/45 dB mean PSNR (end to end, on each frontier), 6 steps:" in stdout
    bench = json.loads(out.read_text())
    assert [(row["steps"], row["setting"]) for row in bench["rows"]] == [
        (steps, setting) for steps in (4, 6) for setting in ({}, {"rel_l1_thresh": 0.2}, {"rel_l1_thresh": 1e9})
    ]
    assert bench["rows"][2]["block_stack_evaluations"] == 4
    assert [(front["variant"], front["steps"]) for front in bench["frontiers"]] == [("tea_cache", 4), ("tea_cache", 6)]
    assert set(bench["frontiers"][0]["speedup_at_db"]) == {"35", "40", "45"}
    for front in bench["frontiers"]:
        psnrs = [point["psnr_db"] for point in front["points"]]
        assert psnrs == sorted(psnrs, reverse=True) and psnrs[0] == PSNR_CAP_DB


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--variant", "fast={}"], "a variant looks like LABEL=BACKEND:JSON"),
        (["--variant", "fast=tea_cache:[1]"], "cache config must be a JSON object"),
        (["--values", "tea_cache=fast"], "values look like BACKEND=V1,V2"),
    ],
)
def test_bench_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["bench", *flags])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_bench_parses_variants_and_values():
    args = build_parser().parse_args(
        ["bench", "--variant", 'identity=tea_cache:{"coefficients": [0, 0, 0, 1, 0]}', "--values", "tea_cache=0.1,1"]
    )
    assert args.variant == [Variant("identity", "tea_cache", {"coefficients": [0, 0, 0, 1, 0]})]
    assert args.values == [("tea_cache", [0.1, 1.0])] and args.backends is None and args.steps == []
