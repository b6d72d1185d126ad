"""The engine's cache backend: swapped between requests for tools, and the layers of settings it is built from
(the model folder's, a cache profile's, --cache-config's)."""

import json
import shutil
import threading

import numpy as np
import pytest
from conftest import pixels

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.cache import NoCache
from teaserve.cli.args import build_parser
from teaserve.engine import AsyncEngine, CacheProfile, EngineArgs, RequestCancelledError
from teaserve.engine.cache_profile import MAX_PROFILE_BYTES
from teaserve.pipelines import load_model

STEPS = 6


def generate(engine: AsyncEngine, cache_config=None, **params):
    settings = {"num_inference_steps": STEPS, "seed": 0, "cache_config": cache_config, **params}
    request = engine.prepare("a cat", OmniDiffusionSamplingParams(**settings))
    return engine.submit(request, block=True).result(60)


@pytest.fixture(scope="module")
def engine(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen), profile=True)
    yield engine
    engine.shutdown()


def test_swapping_backends_between_requests(engine):
    reference = generate(engine)
    assert reference.metrics.cache is None and engine.cache_backend_name == "none"
    tea_cache = engine.create_cache_backend("tea_cache", {"rel_l1_thresh": 1e9})
    try:
        assert engine.use_cache_backend(tea_cache).name == "none"
        assert engine.cache is tea_cache and engine.cache_backend_name == "tea_cache"
        served = engine.served_model.cache  # what the model card tells clients follows the swap
        assert served.backend == "tea_cache" and served.defaults["rel_l1_thresh"] == 1e9
        skipping = generate(engine)
        never_skipping = generate(engine, {"rel_l1_thresh": 1e-9})
    finally:
        engine.use_cache_backend(engine.create_cache_backend("none"))
    back = generate(engine)
    assert engine.served_model.cache.backend == "none" and engine.served_model.cache.request_keys == ("enabled",)
    assert skipping.metrics.cache["skipped_steps"] == 2 * (STEPS - 2)  # both CFG branches: all but first and last
    assert never_skipping.metrics.cache["skipped_steps"] == 0
    assert np.array_equal(pixels(never_skipping.images[0]), pixels(reference.images[0]))
    assert not np.array_equal(pixels(skipping.images[0]), pixels(reference.images[0]))
    assert back.metrics.cache is None and np.array_equal(pixels(back.images[0]), pixels(reference.images[0]))
    # The worker's own hooks stayed: transformer calls are counted and timed.
    assert skipping.metrics.transformer_calls == 2 * STEPS and skipping.metrics.transformer_seconds > 0


def test_stop_checks_inside_a_step_survive_a_swap(engine):
    transformer = engine.model.pipeline.transformer
    engine.use_cache_backend(engine.create_cache_backend("tea_cache", {"rel_l1_thresh": 1e-9}))
    block_calls, after_block_calls = [], []
    request = engine.prepare("a cat", OmniDiffusionSamplingParams(num_inference_steps=STEPS, true_cfg_scale=1.0))

    def cancel_in_the_third_step(module, args):
        block_calls.append(1)
        if len(block_calls) == 3:
            engine.cancel(request.request_id)

    # Registered after the worker's stop checks, so they run after them.
    hooks = [
        transformer.transformer_blocks[0].register_forward_pre_hook(cancel_in_the_third_step),
        transformer.norm_out.register_forward_pre_hook(lambda module, args: after_block_calls.append(1)),
    ]
    try:
        with pytest.raises(RequestCancelledError):
            engine.submit(request, block=True).result(60)
    finally:
        for hook in hooks:
            hook.remove()
        engine.use_cache_backend(engine.create_cache_backend("none"))
    assert len(block_calls) == 3 and len(after_block_calls) == 2  # stopped inside the step, after the block


def test_a_swap_is_refused_while_a_request_runs_or_waits(engine):
    started, release = threading.Event(), threading.Event()

    def hold(event):
        started.set()
        release.wait(30)

    running = engine.submit(engine.prepare("a", OmniDiffusionSamplingParams(num_inference_steps=2)), on_progress=hold)
    try:
        assert started.wait(30)
        with pytest.raises(RuntimeError, match="no request is queued or running"):
            engine.use_cache_backend(engine.create_cache_backend("tea_cache"))
        queued = engine.submit(engine.prepare("b", OmniDiffusionSamplingParams(num_inference_steps=2)))
        release.set()
        running.result(60)
        queued.result(60)
    finally:
        release.set()
    assert engine.cache_backend_name == "none"
    engine.use_cache_backend(engine.create_cache_backend("none"))  # idle again: allowed


class Unappliable(NoCache):
    def apply(self, pipeline) -> None:
        raise ValueError("this transformer is not supported")


def test_a_backend_that_fails_to_apply_leaves_the_engine_as_it_was(engine):
    tea_cache = engine.create_cache_backend("tea_cache", {"rel_l1_thresh": 1e9})
    engine.use_cache_backend(tea_cache)
    try:
        with pytest.raises(ValueError, match="not supported"):
            engine.use_cache_backend(Unappliable())
        assert engine.cache is tea_cache
        assert generate(engine).metrics.cache["skipped_steps"] == 2 * (STEPS - 2)  # its hooks are back on
    finally:
        engine.use_cache_backend(engine.create_cache_backend("none"))


# -- cache profiles ----------------------------------------------------------------------------------------------
def write_profile(path, cache, **fields):
    path.write_text(json.dumps({"model": "tiny", **fields, "cache": cache}))
    return path


def test_a_profile_quality_table_makes_quality_target_work(tiny_qwen, tmp_path):
    table = {str(STEPS): [[1e-9, 100.0], [0.5, 38.0], [1e9, 20.0]]}
    profile = write_profile(
        tmp_path / "profile.json", {"tea_cache": {"quality_table": table}}, transformer="QwenImageTransformer2DModel"
    )
    with Omni(model=str(tiny_qwen), cache_backend="tea_cache") as omni, pytest.raises(ValueError, match="needs a"):
        omni.generate("x", OmniDiffusionSamplingParams(cache_config={"quality_target": 30}))
    with Omni(model=str(tiny_qwen), cache_backend="tea_cache", cache_profile=str(profile)) as omni:
        outputs = {
            target: generate(omni.engine, {"quality_target": target}).metrics.cache for target in (99, 35, 15, 100.0)
        }
    assert outputs[99]["quality"]["rel_l1_thresh"] == 1e-9 and outputs[99]["skipped_steps"] == 0
    assert outputs[35]["quality"] == {
        "target_db": 35.0,
        "calibrated_steps": STEPS,
        "rel_l1_thresh": 0.5,
        "calibrated_psnr_db": 38.0,
    }
    assert outputs[15]["rel_l1_thresh"] == 1e9 and outputs[15]["skipped_steps"] == 2 * (STEPS - 2)
    # A server-wide default target in --cache-config, its table from the profile.
    with Omni(
        model=str(tiny_qwen), cache_backend="tea_cache", cache_profile=str(profile), cache_config={"quality_target": 15}
    ) as omni:
        assert generate(omni.engine).metrics.cache["rel_l1_thresh"] == 1e9


def test_profile_layers_between_the_model_folder_and_cache_config(tiny_qwen, tmp_path):
    model = load_model(str(tiny_qwen))
    model.cache_defaults = {"tea_cache": {"rel_l1_thresh": 0.3, "max_consecutive_skips": 2}}
    profile = write_profile(tmp_path / "profile.json", {"tea_cache": {"rel_l1_thresh": 0.5}, "none": {}})
    engine = AsyncEngine(model, cache_backend="tea_cache", cache_profile=str(profile))
    try:
        assert (engine.cache.config.rel_l1_thresh, engine.cache.config.max_consecutive_skips) == (0.5, 2)
        over = engine.create_cache_backend("tea_cache", {"rel_l1_thresh": 0.7})
        assert (over.config.rel_l1_thresh, over.config.max_consecutive_skips) == (0.7, 2)
        assert engine.cache_settings("tea_cache") == {"rel_l1_thresh": 0.5, "max_consecutive_skips": 2}
    finally:
        engine.shutdown()
    # A quality target whose table is in the model folder passes the check made before loading.
    model = load_model(str(tiny_qwen))
    model.cache_defaults = {"tea_cache": {"quality_table": {"6": [[0.4, 40.0]]}}}
    engine = AsyncEngine(model, cache_backend="tea_cache", cache_config={"quality_target": 35})
    try:
        assert generate(engine).metrics.cache["quality"]["rel_l1_thresh"] == 0.4
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        (json.dumps({"coefficients": [0, 0, 0, 1, 0]}), 'no "cache" object'),
        (json.dumps({"cache": {"warp_cache": {}}}), r"unknown cache backend\(s\) \['warp_cache'\]; valid: .*tea_cache"),
        (json.dumps({"cache": {"tea_cache": [1]}}), "settings of tea_cache must be a JSON object"),
        (json.dumps({"cache": {"tea_cache": {"rel_l1_thresh": -1}}}), "rel_l1_thresh must be a number"),
        (json.dumps({"cache": {"tea_cache": {"speed": 2}}}), "valid keys: rel_l1_thresh"),
        ("x" * (MAX_PROFILE_BYTES + 1), f"larger than {MAX_PROFILE_BYTES} bytes"),
    ],
)
def test_bad_profiles_are_refused_before_loading(tmp_path, content, message):
    path = tmp_path / "profile.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        AsyncEngine(str(tmp_path / "no-model-here"), cache_backend="tea_cache", cache_profile=str(path))


def test_a_profile_of_another_transformer_is_refused(tiny_qwen, tmp_path):
    profile = write_profile(tmp_path / "p.json", {"tea_cache": {}}, transformer="FluxTransformer2DModel")
    with pytest.raises(ValueError, match="calibrated on a FluxTransformer2DModel, this model's transformer is Qwen"):
        AsyncEngine(str(tiny_qwen), cache_profile=str(profile))
    with pytest.raises(ValueError, match="cannot read cache profile"):
        CacheProfile.read(tmp_path)


def test_cache_profile_is_a_flag_of_serve_generate_and_bench():
    parser = build_parser()
    for command in (["serve"], ["generate", "a cat"], ["bench"]):
        args = parser.parse_args([*command, "--cache-profile", "profile.json"])
        assert args.cache_profile == "profile.json"
    assert EngineArgs.from_cli_args(parser.parse_args(["serve", "--cache-profile", "p.json"])).cache_profile == "p.json"


def test_a_model_folder_chooses_its_backend_unless_the_user_or_the_environment_does(tiny_qwen, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(tiny_qwen, folder)
    profile_path = folder / "teaserve.json"
    profile = json.loads(profile_path.read_text()) if profile_path.exists() else {}
    profile_path.write_text(json.dumps({**profile, "cache_backend": "learned"}))
    monkeypatch.delenv("DIFFUSION_CACHE_BACKEND", raising=False)

    def backend_of(**settings):
        engine = AsyncEngine(str(folder), **settings)
        try:
            return engine.cache.name
        finally:
            engine.shutdown()

    assert backend_of() == "learned"
    assert backend_of(cache_backend="none") == "none" and backend_of(cache_backend="tea_cache") == "tea_cache"
    monkeypatch.setenv("DIFFUSION_CACHE_BACKEND", "tea_cache")
    assert backend_of() == "tea_cache"
