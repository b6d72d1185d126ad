"""Server limits, the per-request deadline, admission of edits before decoding, model-only parameters and errors
that name their parameter: through the real server (uvicorn, the openai client) and the Python API."""

import subprocess
import sys
import threading

import httpx
import openai
import pytest
import torch
from conftest import RunningServer, decode_b64_image, png_bytes
from PIL import Image, ImageFile

from teaserve import OmniDiffusionSamplingParams
from teaserve.engine import (
    AsyncEngine,
    DeviceOutOfMemoryError,
    EngineArgs,
    InvalidImageError,
    InvalidParameterError,
    RequestTimeoutError,
)
from teaserve.engine.images import open_inputs
from teaserve.engine.params import MAX_SEED
from teaserve.server import build_app

LIMITS = {"max_steps": 20, "max_outputs": 2, "max_request_pixels": 2 * 64 * 64}


@pytest.fixture(scope="module")
def engine(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen), **LIMITS)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with RunningServer(build_app(engine, shutdown_engine=False)) as server:
        yield server


def refusal(server, body: dict) -> dict:
    response = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", **body}, timeout=60)
    assert response.status_code == 400, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"num_inference_steps": 21}, "num_inference_steps", "over the limit of 20; max_steps (--max-steps)"),
        ({"n": 3}, "n", "over the limit of 2; max_outputs (--max-outputs)"),
        ({"size": "2048x2048"}, "size", "max_image_pixels (--max-image-pixels)"),
        ({"size": "16x128"}, "size", "aspect ratio of 8, over the limit of 4; max_aspect_ratio (--max-aspect-ratio)"),
        ({"size": "16x32768"}, "size", "max_aspect_ratio (--max-aspect-ratio)"),
        ({"size": "16x65536"}, "size", "max_aspect_ratio (--max-aspect-ratio)"),
        ({"n": 2, "size": "64x80"}, "n", "2 images of 64x80 make 10240 pixels, over the limit of 8192"),
        ({"seed": MAX_SEED, "n": 2}, "seed", f"the largest seed for 2 images is {MAX_SEED - 1}"),
        ({"size": "٦٤x٦٤"}, "size", "WIDTHxHEIGHT"),
        ({"size": "99999999999x64"}, "size", "WIDTHxHEIGHT"),
        ({"size": "65552x16"}, "size", "width must be an integer in 1..65536"),
        ({"num_inference_steps": True}, "num_inference_steps", "valid integer"),
    ],
)
def test_requests_over_a_limit_or_malformed_are_400_naming_the_parameter(server, body, param, message):
    error = refusal(server, body)
    assert error["param"] == param and message in error["message"]


def test_infinite_numbers_are_400(server):
    response = httpx.post(
        f"{server.url}/v1/images/generations",
        content=b'{"prompt": "x", "true_cfg_scale": 1e400}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "true_cfg_scale"
    assert "finite number" in response.json()["error"]["message"]


def test_limits_through_the_openai_client(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(prompt="x", size="16x32768")
    assert error.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(prompt="x", n=2, extra_body={"seed": MAX_SEED})
    assert error.value.body["param"] == "seed"
    # right at the limits the request runs
    result = client.images.generate(
        prompt="x", n=2, size="64x64", extra_body={"num_inference_steps": 20, "seed": MAX_SEED - 1}
    )
    assert [item.model_extra["seed"] for item in result.data] == [MAX_SEED - 1, MAX_SEED]


def test_python_api_gets_the_same_limits_naming_the_setting(engine):
    with pytest.raises(InvalidParameterError, match=r"max_steps \(--max-steps\) raises it") as error:
        engine.prepare("x", OmniDiffusionSamplingParams(num_inference_steps=21))
    assert error.value.param == "num_inference_steps"
    with pytest.raises(ValueError, match="max_aspect_ratio"):
        engine.prepare("x", OmniDiffusionSamplingParams(width=16, height=65536))
    with pytest.raises(InvalidParameterError, match="seed") as error:
        engine.prepare("x", OmniDiffusionSamplingParams(seed=MAX_SEED, num_outputs_per_prompt=2))
    assert error.value.param == "seed"
    # decoded inputs are bounded too: a picture over the per-image cap, given as a PIL image
    with pytest.raises(InvalidImageError, match="max_input_image_pixels"):
        open_inputs([Image.new("RGB", (11, 10))], None, EngineArgs(max_input_image_pixels=100))
    with pytest.raises(InvalidImageError, match=r"an image must be encoded bytes, a file path, .* got list"):
        open_inputs([[1, 2, 3]], None, EngineArgs())


def test_engine_args_validate_and_round_trip_through_flags():
    import argparse

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(
        parser.parse_args(["--max-steps", "30", "--request-timeout", "0", "--cache-config", '{"rel_l1_thresh": 0.3}'])
    )
    assert args.max_steps == 30 and args.request_timeout is None and args.cache_config == {"rel_l1_thresh": 0.3}
    assert args.max_outputs == EngineArgs().max_outputs
    with pytest.raises(ValueError, match=r"max_steps \(--max-steps\) must be an integer in 1\.\.1000, got 0"):
        EngineArgs(max_steps=0)
    with pytest.raises(ValueError, match=r"max_aspect_ratio \(--max-aspect-ratio\) must be a finite number"):
        EngineArgs(max_aspect_ratio=float("inf"))


# -- the deadline ---------------------------------------------------------------------------------------------
class SlowFirstBlock:
    """Makes the first transformer block of the next call take longer than the deadline; counts the second's runs."""

    def __init__(self, transformer, seconds: float):
        self.seconds = seconds
        self.second_block_runs = 0
        blocks = transformer.transformer_blocks
        self.hooks = [
            blocks[0].register_forward_pre_hook(self._slow_once),
            blocks[1].register_forward_pre_hook(self._count),
        ]

    def _slow_once(self, module, args):
        if self.seconds:
            threading.Event().wait(self.seconds)
            self.seconds = 0

    def _count(self, module, args):
        self.second_block_runs += 1

    def remove(self):
        for hook in self.hooks:
            hook.remove()


@pytest.fixture(scope="module")
def deadline_engine(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen), request_timeout=1.0)
    yield engine
    engine.shutdown()


def test_a_request_past_its_deadline_stops_inside_the_step_and_the_worker_moves_on(deadline_engine):
    slow = SlowFirstBlock(deadline_engine.model.pipeline.transformer, seconds=1.5)
    try:
        params = OmniDiffusionSamplingParams(num_inference_steps=4, true_cfg_scale=1.0, seed=0)
        with pytest.raises(RequestTimeoutError, match="deadline of 1 s") as error:
            deadline_engine.submit(deadline_engine.prepare("a cat", params)).result(60)
        # stopped inside the first transformer call: its second block never ran
        assert slow.second_block_runs == 0
        assert "--request-timeout" in str(error.value)
        after = deadline_engine.submit(deadline_engine.prepare("a cat", params)).result(60)
    finally:
        slow.remove()
    assert after.metrics.steps == 4


def test_http_request_past_its_deadline_fails_and_the_next_succeeds(deadline_engine):
    slow = SlowFirstBlock(deadline_engine.model.pipeline.transformer, seconds=1.5)
    with RunningServer(build_app(deadline_engine, shutdown_engine=False)) as server:
        try:
            body = {"prompt": "x", "num_inference_steps": 4, "true_cfg_scale": 1.0}
            failed = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=60)
        finally:
            slow.remove()
        assert failed.status_code >= 500 and set(failed.json()["error"]) == {"message", "type", "param", "code"}
        assert slow.second_block_runs == 0
        result = server.client().images.generate(prompt="x", extra_body={"num_inference_steps": 2})
        assert decode_b64_image(result.data[0].b64_json).size == (32, 32)


def test_device_out_of_memory_fails_alone_as_its_own_error(engine):
    transformer = engine.model.pipeline.transformer
    failures = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")]

    def run_out_once(module, args):
        if failures:
            raise failures.pop()

    hook = transformer.register_forward_pre_hook(run_out_once)
    try:
        params = OmniDiffusionSamplingParams(num_inference_steps=2, seed=1)
        with pytest.raises(DeviceOutOfMemoryError) as error:
            engine.submit(engine.prepare("a cat", params)).result(60)
        assert "80.00 GiB" not in str(error.value) and "memory" in str(error.value)
        assert engine.submit(engine.prepare("a cat", params)).result(60).metrics.steps == 2
    finally:
        hook.remove()


# -- edits: admission before decoding ---------------------------------------------------------------------------
def garbage_png(width: int, height: int) -> bytes:
    """A PNG whose header says width x height and whose pixel data is garbage: it fails only if decoded."""
    header = png_bytes(Image.new("RGB", (width, height)))[:33]  # signature + IHDR chunk
    return header + b"\x00\x00\x10\x00IDAT" + b"garbage!" * 512


@pytest.fixture(scope="module")
def edit_server(tiny_edit_plus, small_edits):
    engine = AsyncEngine(str(tiny_edit_plus), max_input_image_pixels=64 * 64, max_input_pixels=6000)
    with RunningServer(build_app(engine)) as server:
        yield server


def post_edit(server, files, **data):
    return httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "x", **data}, files=files, timeout=60)


def test_garbage_pixels_fail_only_when_decoded(edit_server):
    response = post_edit(edit_server, [("image", ("a.png", garbage_png(32, 32), "image/png"))])
    assert response.status_code == 400 and "could not be decoded" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("files", "param", "message"),
    [
        ([("image[]", ("a.png", garbage_png(32, 32), "image/png"))] * 4, "image", "takes 1 to 3 input image(s), got 4"),
        (
            [("image", ("a.png", garbage_png(32, 32), "image/png")), ("mask", ("m.png", garbage_png(32, 32), "i/p"))],
            "mask",
            "masks are not supported",
        ),
        ([("image", ("a.png", garbage_png(128, 128), "image/png"))], "image", "max_input_image_pixels"),
        ([("image[]", ("a.png", garbage_png(64, 64), "image/png"))] * 2, "image", "8192 pixels in all"),
    ],
)
def test_edits_are_refused_from_counts_and_headers_before_any_pixel_is_decoded(edit_server, files, param, message):
    response = post_edit(edit_server, files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_bad_text_fields_are_refused_before_decoding(edit_server):
    response = post_edit(edit_server, [("image", ("a.png", garbage_png(32, 32), "image/png"))], n="true")
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


@pytest.mark.parametrize("field", ["cache_config", "seed", "layers"])
def test_deeply_nested_json_in_a_form_field_is_a_400(edit_server, field):
    response = post_edit(
        edit_server, [("image", ("a.png", garbage_png(32, 32), "image/png"))], **{field: "[" * 100_000}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert len(response.json()["error"]["message"]) < 500


def test_uploads_are_decoded_off_the_event_loop(edit_server, monkeypatch):
    threads = []
    original = ImageFile.ImageFile.load

    def load(image):
        threads.append(threading.current_thread())
        return original(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    result = edit_server.client().images.edit(
        image=("a.png", png_bytes(Image.new("RGB", (32, 32), (200, 0, 0))), "image/png"),
        prompt="x",
        extra_body={"num_inference_steps": 2},
    )
    assert decode_b64_image(result.data[0].b64_json).size == (32, 32)
    assert threads and edit_server.thread not in threads  # the server thread runs the event loop


# -- model-only parameters ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layered_server(tiny_layered, small_edits):
    engine = AsyncEngine(str(tiny_layered))
    with RunningServer(build_app(engine)) as server:
        yield server


@pytest.mark.parametrize(
    ("data", "param", "message"),
    [
        ({"layers": "1"}, "layers", "layers must be an integer in 2..10, got 1"),
        ({"layers": "2.5"}, "layers", "layers must be an integer in 2..10, got 2.5"),
        ({"resolution": "512"}, "resolution", "resolution must be one of 640, 1024, got 512"),
        ({"flavour": "sweet"}, "flavour", "unknown parameter 'flavour'; QwenImageLayeredPipeline also takes: layers"),
    ],
)
def test_a_layered_model_checks_its_own_parameters(layered_server, data, param, message):
    image = png_bytes(Image.new("RGBA", (32, 32), (0, 0, 200, 255)))
    response = post_edit(layered_server, [("image", ("a.png", image, "image/png"))], **data)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and message in response.json()["error"]["message"]


def test_layers_count_toward_the_pixels_of_a_request(tiny_layered, small_edits):
    engine = AsyncEngine(str(tiny_layered), max_request_pixels=5 * 64 * 64)
    try:
        request = {"prompt": "x", "multi_modal_data": {"image": Image.new("RGB", (64, 64))}}
        assert engine.prepare(request, OmniDiffusionSamplingParams(layers=4)).model_knobs == {
            "layers": 4,
            "resolution": 640,
        }
        with pytest.raises(InvalidParameterError, match=r"1 x 6 image\(s\) of 64x64") as error:
            engine.prepare(request, OmniDiffusionSamplingParams(layers=5))
        assert error.value.param == "n"
    finally:
        engine.shutdown()


def test_generate_passes_model_parameters_from_the_command_line(tiny_layered, small_edits, tmp_path, capsys):
    from teaserve.cli.main import main

    source = tmp_path / "in.png"
    Image.new("RGBA", (32, 32), (0, 0, 200, 255)).save(source)
    out = tmp_path / "out.png"
    argv = ["generate", str(tiny_layered), "x", "--image", str(source), "--model-param", "layers=2", "--steps", "2"]
    assert main([*argv, "-o", str(out)]) == 0
    assert sorted(path.name for path in tmp_path.glob("out-*.png")) == ["out-0.png", "out-1.png", "out-2.png"]
    assert main([*argv, "--model-param", "layers=11", "-o", str(out)]) == 2
    assert "layers must be an integer in 2..10, got 11" in capsys.readouterr().err


# -- lazy imports ---------------------------------------------------------------------------------------------
def test_importing_the_cache_package_loads_no_engine_or_model():
    code = (
        "import sys, teaserve.cache, teaserve\n"
        "print(sorted(m for m in sys.modules if m.startswith(('teaserve.engine', 'teaserve.pipelines'))))\n"
        "from teaserve import Omni, OmniDiffusionSamplingParams\n"
        "print(Omni.__module__, OmniDiffusionSamplingParams.__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.splitlines() == ["[]", "teaserve.engine.omni teaserve.engine.params"]
