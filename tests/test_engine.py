"""Engine behaviour on a tiny Qwen-Image saved to disk: sizes, seeds, CFG, cancellation, failures, validation."""

import json
import threading

import numpy as np
import pytest
from conftest import pixels
from pydantic import ValidationError

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.engine import AsyncEngine, GenerationError, InvalidParameterError, RequestCancelledError
from teaserve.pipelines import load_model


@pytest.fixture(scope="module")
def omni(tiny_qwen):
    with Omni(model=str(tiny_qwen)) as omni:
        yield omni


def test_generates_requested_size(omni):
    (output,) = omni.generate("a cat", OmniDiffusionSamplingParams(width=48, height=32, num_inference_steps=3))
    assert [image.size for image in output.images] == [(48, 32)]
    assert output.metrics.steps == 3 and output.metrics.num_inference_steps == 3
    assert len(output.request_id) == 36 and output.request_id.count("-") == 4


def test_default_size_and_steps_come_from_the_model_profile(omni):
    (output,) = omni.generate("a cat", OmniDiffusionSamplingParams(true_cfg_scale=1.0))
    assert output.images[0].size == (32, 32)
    assert output.metrics.steps == 8


def test_same_seed_same_pixels_other_seed_differs(omni):
    params = OmniDiffusionSamplingParams(seed=7, num_inference_steps=3)
    first, second = omni.generate(["a cat", "a cat"], params)
    other = omni.generate("a cat", OmniDiffusionSamplingParams(seed=8, num_inference_steps=3))[0]
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))
    assert not np.array_equal(pixels(first.images[0]), pixels(other.images[0]))


def test_seed_zero_is_honoured_and_missing_seed_is_reported(omni):
    zero_a = omni.generate("a dog", OmniDiffusionSamplingParams(seed=0, num_inference_steps=2))[0]
    zero_b = omni.generate("a dog", OmniDiffusionSamplingParams(seed=0, num_inference_steps=2))[0]
    drawn = omni.generate("a dog", OmniDiffusionSamplingParams(num_inference_steps=2))[0]
    assert zero_a.seed == 0 and np.array_equal(pixels(zero_a.images[0]), pixels(zero_b.images[0]))
    replay = omni.generate("a dog", OmniDiffusionSamplingParams(seed=drawn.seed, num_inference_steps=2))[0]
    assert np.array_equal(pixels(drawn.images[0]), pixels(replay.images[0]))


def test_two_outputs_per_prompt_each_with_its_own_seed(omni):
    (output,) = omni.generate(
        "a cat", OmniDiffusionSamplingParams(seed=3, num_outputs_per_prompt=2, num_inference_steps=2)
    )
    assert len(output.images) == 2 and output.seeds == [3, 4]
    assert not np.array_equal(pixels(output.images[0]), pixels(output.images[1]))
    (alone,) = omni.generate("a cat", OmniDiffusionSamplingParams(seed=4, num_inference_steps=2))
    assert np.abs(pixels(alone.images[0]) - pixels(output.images[1])).max() <= 1


def test_one_output_per_prompt_in_order(omni):
    outputs = omni.generate(
        ["a cat", {"prompt": "a dog", "negative_prompt": "blurry"}], OmniDiffusionSamplingParams(num_inference_steps=2)
    )
    assert [o.prompt for o in outputs] == ["a cat", "a dog"]
    assert len({o.request_id for o in outputs}) == 2


def test_true_cfg_runs_two_transformer_calls_per_step(omni):
    steps = 4
    cfg = omni.generate(
        "a cat", OmniDiffusionSamplingParams(num_inference_steps=steps, negative_prompt="blurry", true_cfg_scale=4.0)
    )[0]
    no_cfg = omni.generate("a cat", OmniDiffusionSamplingParams(num_inference_steps=steps, true_cfg_scale=1.0))[0]
    assert cfg.metrics.transformer_calls == 2 * steps
    assert no_cfg.metrics.transformer_calls == steps


def test_model_default_guidance_applies_without_a_negative_prompt(omni):
    # Qwen-Image's recommended sampling: blank negative prompt, true CFG 4.0.
    output = omni.generate("a cat", OmniDiffusionSamplingParams(num_inference_steps=3))[0]
    assert output.metrics.transformer_calls == 6


def test_cancellation_stops_a_running_request_early(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen))
    try:
        request = engine.prepare("a cat", OmniDiffusionSamplingParams(num_inference_steps=50, true_cfg_scale=1.0))
        seen = []

        def on_progress(event):
            seen.append(event.step)
            if event.step == 2:
                engine.cancel(request.request_id)

        handle = engine.submit(request, on_progress=on_progress)
        with pytest.raises(RequestCancelledError):
            handle.result(timeout=60)
        assert max(seen) <= 3
        # the engine serves the next request normally
        after = engine.submit(engine.prepare("a cat", OmniDiffusionSamplingParams(num_inference_steps=2))).result(60)
        assert after.metrics.steps == 2
    finally:
        engine.shutdown()


def test_cancelling_a_queued_request_means_it_never_runs(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen))
    try:
        gate = threading.Event()
        first = engine.submit(
            engine.prepare("a", OmniDiffusionSamplingParams(num_inference_steps=2)),
            on_progress=lambda event: gate.wait(10),
        )
        queued = engine.submit(engine.prepare("b", OmniDiffusionSamplingParams(num_inference_steps=2)))
        queued.cancel()
        gate.set()
        assert first.result(60).metrics.steps == 2
        assert queued.future.cancelled()
    finally:
        engine.shutdown()


def test_a_failing_request_does_not_stop_the_next(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen))
    try:
        transformer = engine.model.pipeline.transformer
        failures = [RuntimeError("simulated device failure")]

        def fail_once(module, args):
            if failures:
                raise failures.pop()

        hook = transformer.register_forward_pre_hook(fail_once)
        params = OmniDiffusionSamplingParams(num_inference_steps=2, seed=1)
        with pytest.raises(GenerationError) as failure:
            engine.submit(engine.prepare("a cat", params)).result(60)
        # the message names the request, never the internal error, which stays with the cause (and the log)
        assert "simulated" not in str(failure.value) and "failed" in str(failure.value)
        assert str(failure.value.__cause__) == "simulated device failure"
        output = engine.submit(engine.prepare("a cat", params)).result(60)
        hook.remove()
        assert output.images[0].size == (32, 32)
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": 0}, r"num_inference_steps must be an integer in 1\.\.1000"),
        ({"num_inference_steps": 2.5}, r"num_inference_steps must be an integer"),
        ({"num_inference_steps": True}, r"num_inference_steps must be an integer in 1\.\.1000, got True"),
        ({"width": 0, "height": 32}, r"width must be an integer in 1\.\.65536"),
        ({"width": 32}, r"give both width and height"),
        ({"num_outputs_per_prompt": 11}, r"num_outputs_per_prompt must be an integer in 1\.\.10"),
        ({"seed": -1}, r"seed must be an integer in 0\.\."),
        ({"true_cfg_scale": float("nan")}, r"true_cfg_scale must be a finite number in 0\.\.100"),
        ({"guidance_scale": 10**400}, r"guidance_scale must be a finite number"),
        ({"negative_prompt": 3}, r"negative_prompt must be a string"),
        ({"cache_config": "fast"}, r"cache_config must be an object"),
    ],
)
def test_bad_params_name_the_valid_choices(kwargs, message):
    with pytest.raises(InvalidParameterError, match=message) as error:
        OmniDiffusionSamplingParams(**kwargs)
    assert isinstance(error.value, ValueError)
    assert error.value.param == {"width": "size", "num_outputs_per_prompt": "n"}.get(
        next(iter(kwargs)), next(iter(kwargs))
    )


def test_params_are_frozen_and_replace_validates():
    params = OmniDiffusionSamplingParams(seed=1, layers=4)
    with pytest.raises(ValidationError):
        params.seed = 2
    assert params.replace(seed=2).seed == 2 and params.replace(seed=2).model_knobs == {"layers": 4}
    with pytest.raises(InvalidParameterError, match="seed must be"):
        params.replace(seed=-1)


def test_requests_the_model_cannot_serve_are_refused_before_running(omni):
    from PIL import Image

    with pytest.raises(ValueError, match="generates from text only"):
        omni.generate({"prompt": "x", "multi_modal_data": {"image": Image.new("RGB", (32, 32))}})
    with pytest.raises(InvalidParameterError, match="layers only applies to QwenImageLayeredPipeline") as error:
        omni.generate("x", OmniDiffusionSamplingParams(layers=4))
    assert error.value.param == "layers"
    with pytest.raises(InvalidParameterError, match="unknown parameter 'flavour'") as error:
        omni.generate("x", OmniDiffusionSamplingParams(flavour="sweet"))
    assert error.value.param == "flavour"
    with pytest.raises(InvalidParameterError, match="multiple of 8 for this model, got 36x32") as error:
        omni.generate("x", OmniDiffusionSamplingParams(width=36, height=32))
    assert error.value.param == "size"
    with pytest.raises(ValueError, match="valid keys: prompt, negative_prompt, multi_modal_data"):
        omni.generate({"prompt": "x", "negative": "y"})


def test_unknown_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(
        ValueError, match=r"unsupported model architecture 'StableDiffusionPipeline'.*QwenImagePipeline"
    ):
        load_model(str(tmp_path))


def test_unreachable_hub_ids_fail_with_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not fetch model 'someone/missing-model' from the Hugging Face Hub"):
        load_model("someone/missing-model")
    with pytest.raises(ValueError, match="neither a model folder nor a Hugging Face Hub id"):
        load_model("./no/such/folder")


def test_unknown_cache_backend_and_env_var(tiny_qwen, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown cache backend 'fast'; valid choices: [\w, ]*none, [\w, ]*tea_cache"):
        Omni(model=str(tiny_qwen), cache_backend="fast")
    monkeypatch.setenv("DIFFUSION_CACHE_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"unknown cache backend 'fast'"):
        Omni(model=str(tiny_qwen))
    monkeypatch.setenv("DIFFUSION_CACHE_BACKEND", "none")
    with Omni(model=str(tiny_qwen)) as omni:
        assert omni.engine.cache_backend_name == "none"


def test_bad_device_and_dtype_name_the_choices():
    from teaserve.pipelines import resolve_device, resolve_dtype

    with pytest.raises(ValueError, match="valid choices: auto, float32, bfloat16, float16"):
        resolve_dtype("float8", resolve_device("cpu"))
    with pytest.raises(ValueError, match="valid examples: auto, cpu, cuda"):
        resolve_device("tpu")


def test_engine_errors_cross_processes_with_their_fields():
    import pickle

    from teaserve.engine import InvalidImageError, QueueFullError, WorkerLostError

    mask = pickle.loads(pickle.dumps(InvalidImageError("the mask is not an image", "mask")))
    assert type(mask) is InvalidImageError and (str(mask), mask.param) == ("the mask is not an image", "mask")
    busy = pickle.loads(pickle.dumps(QueueFullError("busy", retry_after=7)))
    assert (str(busy), busy.retry_after) == ("busy", 7)
    assert str(pickle.loads(pickle.dumps(WorkerLostError("gone")))) == "gone"
