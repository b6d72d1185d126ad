"""The OpenAI-compatible server under a real uvicorn, called with the official openai client and raw HTTP."""

import asyncio
import io

import httpx
import numpy as np
import openai
import pytest
from conftest import RunningServer, decode_b64_image, metric, pixels, png_bytes, wait_until
from PIL import Image

from teaserve.engine import AsyncEngine
from teaserve.server import build_app


@pytest.fixture(scope="module")
def engine(tiny_qwen):
    # long generations (hundreds of steps) test the queue and cancellation
    engine = AsyncEngine(str(tiny_qwen), cache_backend="tea_cache", max_queue_size=2, max_steps=1000)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with RunningServer(build_app(engine, max_body_bytes=256 * 1024, shutdown_engine=False)) as server:
        yield server


@pytest.fixture(scope="module")
def edit_server(tiny_edit_plus, small_edits):
    engine = AsyncEngine(str(tiny_edit_plus), cache_backend="tea_cache")
    with RunningServer(build_app(engine)) as server:
        yield server


def test_generate_two_distinct_pngs_of_the_asked_size(server):
    result = server.client().images.generate(
        prompt="a cat", n=2, size="48x32", extra_body={"seed": 11, "num_inference_steps": 4}
    )
    images = [decode_b64_image(item.b64_json) for item in result.data]
    assert [image.format for image in images] == ["PNG", "PNG"]
    assert [image.size for image in images] == [(48, 32), (48, 32)]
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))
    assert result.size == "48x32" and result.output_format == "png"
    assert [item.model_extra["seed"] for item in result.data] == [11, 12]
    assert result.model_extra["cache"]["backend"] == "tea_cache"
    assert result.model_extra["metrics"]["steps"] == 4


def test_seeds_reproduce_pixels(server):
    client = server.client()
    first, second = (
        client.images.generate(prompt="a dog", extra_body={"seed": 0, "num_inference_steps": 3}) for _ in range(2)
    )
    assert np.array_equal(
        pixels(decode_b64_image(first.data[0].b64_json)), pixels(decode_b64_image(second.data[0].b64_json))
    )


def test_extra_body_cache_overrides_change_the_statistics(server):
    client = server.client()

    def generate(cache_config):
        extra = {"seed": 1, "num_inference_steps": 10, "cache_config": cache_config}
        return client.images.generate(prompt="a cat", extra_body=extra).model_extra["cache"]

    never = generate({"rel_l1_thresh": 1e-9})
    always = generate({"rel_l1_thresh": 1e9})
    disabled = generate({"enabled": False})
    assert never["skipped_steps"] == 0 and never["computed_steps"] == 20
    assert always["computed_steps"] == 4 and always["skipped_steps"] == 16
    assert disabled["enabled"] is False
    with pytest.raises(openai.BadRequestError) as error:
        generate({"threshold": 0.4})
    assert error.value.body["param"] == "cache_config" and "valid keys" in error.value.body["message"]


async def test_async_client(server):
    result = await server.async_client().images.generate(
        prompt="a cat", size="32x32", extra_body={"num_inference_steps": 2}
    )
    assert decode_b64_image(result.data[0].b64_json).size == (32, 32)


def test_streaming_sends_partial_images_then_the_completed_one(server):
    stream = server.client().images.generate(
        prompt="a cat", stream=True, partial_images=2, extra_body={"num_inference_steps": 6, "seed": 3}
    )
    events = list(stream)
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    final = decode_b64_image(events[-1].b64_json)
    assert final.size == (32, 32) and events[-1].size == "32x32"
    plain = server.client().images.generate(prompt="a cat", extra_body={"num_inference_steps": 6, "seed": 3})
    assert np.array_equal(pixels(final), pixels(decode_b64_image(plain.data[0].b64_json)))


def test_the_model_card_lists_the_cache_knobs_a_request_may_set(server):
    listed = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    retrieved = httpx.get(f"{server.url}/v1/models/{listed['id']}").json()
    assert retrieved == listed
    assert server.client().models.retrieve(listed["id"]).model_extra["cache"] == listed["cache"]  # the SDK's call
    assert listed["makes_video"] is False
    assert listed["cache"] == {
        "backend": "tea_cache",
        # no calibrated quality table on the tiny model: no quality_target
        "request_keys": ["enabled", "rel_l1_thresh", "max_consecutive_skips"],
        "tuning_key": "rel_l1_thresh",
        "defaults": {"rel_l1_thresh": 0.2, "max_consecutive_skips": None},
        "quality_target": None,
    }
    unknown = httpx.get(f"{server.url}/v1/models/someone/else")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "model" and unknown.json()["error"]["code"] == "model_not_found"


def test_stream_progress_sends_one_progress_event_per_step(server):
    client = server.client()
    events = list(
        client.images.generate(
            prompt="a cat",
            stream=True,
            partial_images=1,
            extra_body={"num_inference_steps": 4, "seed": 1, "stream_progress": True},
        )
    )
    kinds = [event.type for event in events]
    assert kinds.count("image_generation.progress") == 4 and kinds[-1] == "image_generation.completed"
    assert [event.model_extra["step"] for event in events if event.type == "image_generation.progress"] == [1, 2, 3, 4]
    assert {event.model_extra["num_steps"] for event in events if event.type == "image_generation.progress"} == {4}
    plain = client.images.generate(prompt="a cat", stream=True, extra_body={"num_inference_steps": 4, "seed": 1})
    assert [event.type for event in plain] == ["image_generation.completed"]


def test_other_output_formats(server):
    result = server.client().images.generate(
        prompt="a cat", output_format="jpeg", output_compression=80, extra_body={"num_inference_steps": 2}
    )
    assert decode_b64_image(result.data[0].b64_json).format == "JPEG"
    result = server.client().images.generate(
        prompt="a cat", output_format="webp", extra_body={"num_inference_steps": 2}
    )
    assert decode_b64_image(result.data[0].b64_json).format == "WEBP"


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"prompt": "x", "n": 11}, "n", "less than or equal to 10"),
        ({"prompt": "x", "size": "30x30"}, "size", "multiple of 8"),
        ({"prompt": "x", "size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": "x", "size": "8192x8192"}, "size", "max_image_pixels (--max-image-pixels)"),
        ({"prompt": "x", "response_format": "url"}, "response_format", "b64_json"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
        ({"prompt": "x", "flavour": "sweet"}, "flavour", "unknown parameter"),
        ({"n": 1}, "prompt", "missing required parameter"),
        ({"prompt": "x", "layers": 4}, "layers", "only applies to QwenImageLayeredPipeline"),
    ],
)
def test_bad_requests_are_400_in_openai_shape_and_the_server_goes_on(server, body, param, message):
    response = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and message in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    ok = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "num_inference_steps": 1}, timeout=60)
    assert ok.status_code == 200


def test_bad_json_is_400(server):
    response = httpx.post(
        f"{server.url}/v1/images/generations", content=b'{"prompt": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as error:
        server.client().images.generate(model="dall-e-3", prompt="a cat")
    assert error.value.body["code"] == "model_not_found"
    result = server.client().images.generate(
        model="teaserve/tiny-qwen-image", prompt="a cat", extra_body={"num_inference_steps": 1}
    )
    assert len(result.data) == 1


def test_body_over_the_limit_is_413(server):
    response = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x" * (300 * 1024)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 10_000

    response = httpx.post(
        f"{server.url}/v1/images/generations", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_full_queue_is_429_with_retry_after(server, engine):
    long_request = {"prompt": "x", "extra_body": {"num_inference_steps": 400, "true_cfg_scale": 1.0}}

    async def flood():
        client = server.async_client(timeout=120)
        running = [asyncio.create_task(client.images.generate(**long_request))]
        await asyncio.to_thread(wait_until, lambda: engine.num_running == 1)
        running += [asyncio.create_task(client.images.generate(**long_request)) for _ in range(2)]
        await asyncio.to_thread(wait_until, lambda: engine.queue_depth == 2)
        response = await asyncio.to_thread(httpx.post, f"{server.url}/v1/images/generations", json={"prompt": "x"})
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        return response

    response = asyncio.run(flood())
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1 and response.json()["error"]["type"] == "rate_limit_error"
    wait_until(lambda: not engine.num_running and not engine.queue_depth, timeout=20)
    result = server.client().images.generate(prompt="x", extra_body={"num_inference_steps": 1})
    assert len(result.data) == 1


def test_a_disconnected_client_cancels_its_generation(server, engine):
    calls = []
    hook = engine.model.pipeline.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.url}/v1/images/generations",
                timeout=1.0,
                json={"prompt": "x", "num_inference_steps": 1000, "size": "512x512", "true_cfg_scale": 1.0},
            )
        wait_until(lambda: not engine.num_running and not engine.queue_depth, timeout=60)
    finally:
        hook.remove()
    assert 0 < len(calls) < 1000  # stopped early: the whole generation is 1000 steps of one transformer call
    assert metric(server, "teaserve_requests_total", endpoint="generations", status="disconnected") >= 1


def test_request_ids_are_echoed_or_created(server):
    echoed = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"prompt": "x", "num_inference_steps": 1},
        headers={"x-request-id": "abc-123"},
    )
    assert echoed.headers["x-request-id"] == "abc-123"
    created = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "num_inference_steps": 1})
    assert created.headers["x-request-id"] == created.json()["id"]
    assert httpx.post(f"{server.url}/v1/images/generations", json={}).headers["x-request-id"]


def test_models_health_ready_version(server):
    models = server.client().models.list()
    assert [model.id for model in models.data] == ["teaserve/tiny-qwen-image"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").json()["ready"] is True
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_metrics_move(server):
    before_ok = metric(server, "teaserve_requests_total", endpoint="generations", status="200")
    before_bad = metric(server, "teaserve_requests_total", endpoint="generations", status="400")
    steps = {"backend": "tea_cache", "branch": "cond", "kind": "computed"}  # as printed: sorted
    before_steps = metric(server, "teaserve_denoising_steps_total", **steps)
    answer = server.client().images.generate(prompt="x", extra_body={"num_inference_steps": 3})
    assert answer.model_extra["metrics"]["batch_size"] == 1
    httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "n": 0})
    assert metric(server, "teaserve_requests_total", endpoint="generations", status="200") == before_ok + 1
    assert metric(server, "teaserve_requests_total", endpoint="generations", status="400") == before_bad + 1
    assert metric(server, "teaserve_denoising_steps_total", **steps) > before_steps
    assert metric(server, "teaserve_queue_depth") == 0
    assert "teaserve_request_latency_seconds_bucket" in httpx.get(f"{server.url}/metrics").text


def test_api_key(engine):
    with RunningServer(build_app(engine, api_key="sekret", shutdown_engine=False)) as server:
        with pytest.raises(openai.AuthenticationError):
            server.client().images.generate(prompt="x")
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        for open_path in ("/health", "/ready", "/metrics", "/version"):
            assert httpx.get(f"{server.url}{open_path}").status_code == 200
        result = server.client(api_key="sekret").images.generate(prompt="x", extra_body={"num_inference_steps": 1})
        assert len(result.data) == 1


def test_a_text_to_image_model_refuses_edits_naming_the_models_that_can(server):
    response = httpx.post(
        f"{server.url}/v1/images/edits",
        data={"prompt": "x"},
        files={"image": ("a.png", png_bytes(Image.new("RGB", (32, 32))), "image/png")},
    )
    assert response.status_code == 400
    assert "QwenImageEditPlusPipeline" in response.json()["error"]["message"]


# -- edits ---------------------------------------------------------------------------------------------------
def test_edit_with_one_image_keeps_its_size(edit_server):
    source = Image.new("RGB", (48, 64), (250, 20, 20))
    result = edit_server.client().images.edit(
        image=("in.png", png_bytes(source), "image/png"),
        prompt="make it blue",
        extra_body={"num_inference_steps": 3, "seed": 2},
    )
    assert decode_b64_image(result.data[0].b64_json).size == (48, 64) and result.size == "48x64"


def test_edit_with_two_images_and_form_extensions(edit_server):
    first = png_bytes(Image.new("RGB", (32, 32), (0, 200, 0)))
    second = png_bytes(Image.new("RGBA", (32, 32), (0, 0, 200, 128)))
    result = edit_server.client().images.edit(
        image=[("a.png", first, "image/png"), ("b.bin", second, "application/octet-stream")],
        prompt="put the cat from image 1 on the sofa of image 2",
        n=2,
        extra_body={"num_inference_steps": 4, "seed": 5, "true_cfg_scale": 1.0, "cache_config": {"rel_l1_thresh": 1e9}},
    )
    assert len(result.data) == 2 and [item.model_extra["seed"] for item in result.data] == [5, 6]
    cache = result.model_extra["cache"]
    assert set(cache["branches"]) == {"cond"} and cache["computed_steps"] == 2


def test_edit_stream_events_are_image_edit(edit_server):
    stream = edit_server.client().images.edit(
        image=("a.png", png_bytes(Image.new("RGB", (32, 32))), "image/png"),
        prompt="x",
        stream=True,
        partial_images=1,
        extra_body={"num_inference_steps": 4},
    )
    assert [event.type for event in stream] == ["image_edit.partial_image", "image_edit.completed"]


def test_curl_style_form_fields_are_parsed(edit_server):
    response = httpx.post(
        f"{edit_server.url}/v1/images/edits",
        data={
            "prompt": "x",
            "n": "1",
            "seed": "0",
            "num_inference_steps": "2",
            "true_cfg_scale": "1.0",
            "stream": "false",
            "cache_config": '{"rel_l1_thresh": 0.4}',
            "size": "auto",
        },
        files=[("image[]", ("a.png", png_bytes(Image.new("RGB", (45, 45))), "image/png"))],  # 45 -> 48: multiples of 8
    )
    assert response.status_code == 200, response.text
    assert response.json()["cache"]["rel_l1_thresh"] == 0.4 and response.json()["size"] == "48x48"


@pytest.mark.parametrize(
    ("files", "param", "message"),
    [
        ([("image", ("a.png", b"not an image at all", "image/png"))], "image", "not a supported image"),
        (
            [("image", ("a.png", png_bytes(Image.new("RGB", (64, 64)))[:60], "image/png"))],
            "image",
            "could not be decoded",
        ),
        ([("image", ("a.png", b"", "image/png"))], "image", "empty"),
        ([("image[]", ("a.png", png_bytes(Image.new("RGB", (8, 8))), "image/png"))] * 4, "image", "1 to 3"),
        ([("mask", ("m.png", png_bytes(Image.new("L", (8, 8))), "image/png"))], "image", "at least one input image"),
    ],
)
def test_bad_images_are_400(edit_server, files, param, message):
    response = httpx.post(f"{edit_server.url}/v1/images/edits", data={"prompt": "x"}, files=files)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and message in response.json()["error"]["message"]


def test_decompression_bomb_is_refused_before_decoding(edit_server):
    # a valid PNG header claiming 20000 x 20000 pixels: refused from the header alone
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, format="PNG")
    response = httpx.post(
        f"{edit_server.url}/v1/images/edits",
        data={"prompt": "x"},
        files={"image": ("bomb.png", bomb.getvalue(), "image/png")},
    )
    assert response.status_code == 400 and "pixels" in response.json()["error"]["message"]
    assert httpx.get(f"{edit_server.url}/health").status_code == 200


def test_masks_on_a_model_without_inpainting_are_400(edit_server):
    image = png_bytes(Image.new("RGB", (32, 32)))
    response = httpx.post(
        f"{edit_server.url}/v1/images/edits",
        data={"prompt": "x"},
        files=[("image", ("a.png", image, "image/png")), ("mask", ("m.png", image, "image/png"))],
    )
    assert response.status_code == 400 and "masks are not supported" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "mask"
