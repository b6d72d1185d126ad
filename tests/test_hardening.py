"""The server as an outside client attacks it: schema fuzzing, floods, failing and stuck generations, bad
connections. A real uvicorn on 127.0.0.1 (set up as `teaserve serve` sets it up), the official openai client."""

import asyncio
import contextlib
import json
import logging
import socket
import threading
import uuid

import httpx
import numpy as np
import openai
import pytest
import schemathesis
import torch
from conftest import RunningServer, decode_b64_image, metric, pixels, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from teaserve.engine import AsyncEngine
from teaserve.server import build_app

MARKED_SIZE = "64x32"
"""A request of this size is the one a fault hits; the others are 32x32."""


def marked_tokens(engine) -> int:
    """The image tokens of a MARKED_SIZE request (one per 2x2 patch of latents)."""
    patch = 2 * engine.model.pipeline.vae_scale_factor
    return (64 // patch) * (32 // patch)


@pytest.fixture(scope="module")
def engine(tiny_qwen):
    # One request at a time: the queue tests count what waits behind the running request.
    engine = AsyncEngine(str(tiny_qwen), cache_backend="tea_cache", max_queue_size=8, max_batch_size=1)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with RunningServer(build_app(engine, shutdown_engine=False, max_body_bytes=256 * 1024)) as server:
        yield server


@contextlib.contextmanager
def before_each_forward(engine, action):
    """Run `action(tokens)` before every transformer call of `engine` (tokens: the image tokens it gets)."""
    hook = engine.model.pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: action(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        yield
    finally:
        hook.remove()


@contextlib.contextmanager
def gate(engine, tokens=None):
    """Hold the worker before the transformer call of requests with `tokens` image tokens (any, if None) until
    the yielded event is set; the gate opens when the block ends."""
    released = threading.Event()

    def wait(seen):
        if tokens is None or seen == tokens:
            released.wait(timeout=120)

    with before_each_forward(engine, wait):
        try:
            yield released
        finally:
            released.set()


def quick(seed=0, **extra):
    """A request that costs one transformer call."""
    body = {"prompt": "a cat", "size": "32x32", "num_inference_steps": 1, "true_cfg_scale": 1.0, "seed": seed}
    return {**body, **extra}


def post(server, body, **kwargs):
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=60, **kwargs)


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[len("data: ") :]) for line in response.text.splitlines() if line.startswith("data: ")]


# -- schema ----------------------------------------------------------------------------------------------------
def test_the_image_routes_answer_every_generated_request_as_their_schema_says(server):
    """schemathesis, positive and negative cases: no 5xx, and every answer matches /openapi.json."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json").include(path_regex="^/v1/images/")
    answered = []

    @given(case=st.one_of(*(schema.as_strategy(generation_mode=mode) for mode in GenerationMode)))
    @settings(max_examples=30, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        if case.path.endswith("/generations") and isinstance(case.body, dict):
            # small limits keep it fast (the tiny model defaults to 50 steps): the limits are not fuzzed here
            case.body["num_inference_steps"] = min(_int_or(case.body.get("num_inference_steps"), 1), 1)
            if type(case.body.get("n")) is int:
                case.body["n"] = min(case.body["n"], 2)
        # schema-valid is not always acceptable (e.g. a size that is no WIDTHxHEIGHT): a 4xx is fine there
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=60)
        answered.append((case.path, response.status_code))

    check()
    assert {path for path, _ in answered} == {"/v1/images/generations", "/v1/images/edits"}
    assert ("/v1/images/generations", 200) in answered


def _int_or(value, default):
    return value if type(value) is int else default


# -- metrics ---------------------------------------------------------------------------------------------------
def series(server) -> set[str]:
    """The names and labels of every series on /metrics."""
    text = httpx.get(f"{server.url}/metrics").text
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_paths_that_match_no_route_share_one_metrics_label(server):
    httpx.get(f"{server.url}/v1/images/nothing-here")
    known = series(server)
    counted = metric(server, "teaserve_requests_total", endpoint="unmatched", status="404")
    with httpx.Client(base_url=server.url) as client:
        for index in range(300):
            path = f"/v1/images/{uuid.uuid4().hex}" if index % 3 else f"/{uuid.uuid4().hex}/{index}?q={index}"
            assert client.request(("GET", "POST", "DELETE")[index % 3], path).status_code == 404
    assert series(server) == known  # the 300 paths added no series
    assert metric(server, "teaserve_requests_total", endpoint="unmatched", status="404") == counted + 300


# -- failures --------------------------------------------------------------------------------------------------
SECRET = "secret-internal-detail /etc/teaserve/key"


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (RuntimeError(SECRET), 500, "generation_failed"),
        (torch.OutOfMemoryError(f"CUDA out of memory. {SECRET}"), 503, "out_of_memory"),
    ],
)
def test_a_failing_generation_fails_alone_without_internal_text(server, engine, caplog, error, status, code):
    def fail(tokens):
        if tokens == marked_tokens(engine):
            raise error

    with before_each_forward(engine, fail), caplog.at_level(logging.ERROR):
        with pytest.raises(openai.APIStatusError) as failed:
            server.client().images.generate(prompt="a cat", extra_body=quick(size=MARKED_SIZE))
        streamed = post(server, quick(stream=True, size=MARKED_SIZE))
        fine = server.client().images.generate(prompt="a cat", extra_body=quick())  # the next request is fine
    answer = failed.value.response
    body = answer.json()["error"]
    request_id = answer.headers["x-request-id"]
    assert answer.status_code == status and body["code"] == code and body["type"].endswith("error")
    assert request_id in body["message"]
    assert SECRET not in answer.text and type(error).__name__ not in answer.text
    assert ("retry-after" in answer.headers) == (code == "out_of_memory")
    # a stream has sent its 200: the failure comes as an error event, with no internal text either
    assert streamed.status_code == 200 and SECRET not in streamed.text
    assert sse_events(streamed)[-1]["error"]["code"] == code
    # the details are in the log, under the request id
    assert any(request_id in record.getMessage() and SECRET in (record.exc_text or "") for record in caplog.records)
    assert decode_b64_image(fine.data[0].b64_json).size == (32, 32)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_fails_health_ready_and_the_request_it_held(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen))

    def die(tokens):
        raise SystemExit  # escapes every `except Exception`: the worker thread ends

    with RunningServer(build_app(engine)) as server, before_each_forward(engine, die):
        held = post(server, quick())
        assert held.status_code == 500 and held.json()["error"]["code"] == "generation_failed"
        wait_until(lambda: not engine.is_alive)
        assert httpx.get(f"{server.url}/health").status_code == 503
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503 and ready.json()["reason"] == "worker_stopped"
        refused = post(server, quick())
        assert refused.status_code == 503 and "retry-after" in refused.headers


def test_a_stuck_step_fails_ready_until_it_moves(engine, caplog):
    with (
        RunningServer(build_app(engine, shutdown_engine=False, stall_timeout=0.5)) as server,
        gate(engine, marked_tokens(engine)) as released,
        caplog.at_level(logging.INFO, logger="teaserve.server.lifecycle"),
    ):
        ready = f"{server.url}/ready"
        assert httpx.get(ready).status_code == 200
        answer = {}
        stuck = threading.Thread(target=lambda: answer.update(response=post(server, quick(size=MARKED_SIZE))))
        stuck.start()
        wait_until(lambda: httpx.get(ready).status_code == 503)
        assert httpx.get(ready).json()["reason"] == "stalled"
        assert httpx.get(f"{server.url}/health").status_code == 200  # stuck is still alive
        wait_until(lambda: metric(server, "teaserve_seconds_since_progress") > 2.0)  # many watchdog rounds later
        warnings = [
            record.getMessage()
            for record in caplog.records
            if record.name == "teaserve.server.lifecycle" and record.levelno == logging.WARNING
        ]
        released.set()
        stuck.join(timeout=60)
        wait_until(lambda: httpx.get(ready).status_code == 200)
    assert answer["response"].status_code == 200
    assert len(warnings) == 1 and answer["response"].json()["id"] in warnings[0]  # once per stall, with the id


# -- floods ----------------------------------------------------------------------------------------------------
def test_fifty_clients_on_a_queue_of_eight_get_their_own_images_or_429(server, engine):
    """50 clients at once (a third of them streaming) while the worker holds the first: 1 runs, 8 wait, 41 get
    429 with Retry-After before any event; then every accepted request gets the image its seed makes alone."""
    client = server.async_client(timeout=120)

    async def ask(seed):
        if seed % 3:
            result = await client.images.generate(prompt="a cat", extra_body=quick(seed))
            return result.data[0].b64_json
        stream = await client.images.generate(prompt="a cat", stream=True, extra_body=quick(seed))
        return [event async for event in stream][-1].b64_json

    async def flood():
        tasks = {seed: asyncio.ensure_future(ask(seed)) for seed in range(50)}

        def settled():
            return sum(task.done() for task in tasks.values()) == 41 and engine.queue_depth == 8

        await asyncio.to_thread(wait_until, settled)
        released.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        return {seed: task.exception() or task.result() for seed, task in tasks.items()}

    with gate(engine) as released:
        answers = asyncio.run(flood())
    refused = {seed: answer for seed, answer in answers.items() if isinstance(answer, Exception)}
    accepted = {seed: answer for seed, answer in answers.items() if seed not in refused}
    assert len(accepted) == 9 and len(refused) == 41
    assert any(seed % 3 == 0 for seed in refused) and any(seed % 3 == 0 for seed in accepted)  # streams both ways
    for error in refused.values():
        assert isinstance(error, openai.RateLimitError), error
        assert error.body["code"] == "queue_full" and int(error.response.headers["retry-after"]) >= 1
    for seed, b64 in accepted.items():
        alone = server.client().images.generate(prompt="a cat", extra_body=quick(seed))
        assert np.array_equal(pixels(decode_b64_image(b64)), pixels(decode_b64_image(alone.data[0].b64_json)))


# -- small things ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "content_type", "says"),
    [
        (b"", "application/json", "the request body is empty"),
        (b"[1, 2]", "application/json", "must be a JSON object, got a JSON array"),
        (b'"a cat"', "application/json", "must be a JSON object, got a JSON string"),
        (b"null", "application/json", "the request body is empty"),
        (b'{"prompt": "a cat"}', "text/plain", "Content-Type: application/json"),
    ],
)
def test_an_empty_or_non_object_body_is_a_clear_400(server, content, content_type, says):
    response = httpx.post(
        f"{server.url}/v1/images/generations", content=content, headers={"content-type": content_type}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert says in error["message"] and "None" not in error["message"] and error["param"] is None


def test_health_and_ready_answer_head(server):
    for path in ("/health", "/ready"):
        response = httpx.head(f"{server.url}{path}")
        assert response.status_code == 200 and response.content == b""


def exchange(server, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes it."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received


def test_idle_half_sent_and_slow_connections_are_closed(engine):
    app = build_app(engine, shutdown_engine=False, body_timeout=0.5)
    with RunningServer(app, head_timeout=0.5) as server:
        assert exchange(server, b"") == b""  # connected, never spoke: closed
        assert exchange(server, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n") == b""  # half a head
        slow_body = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        answer = exchange(server, slow_body + b'Content-Length: 100\r\n\r\n{"prompt": ')
        assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.5 s" in answer
        assert httpx.get(f"{server.url}/health").status_code == 200
