"""Graceful shutdown: SIGTERM on a real `teaserve serve` process (conftest's HeldServer, whose transformer calls
wait while a file exists), and the end of the grace period in process."""

import asyncio
import json
import signal
import threading

import httpx
import pytest
from conftest import HeldServer, RunningServer, decode_b64_image, wait_until

from teaserve.engine import AsyncEngine, EngineStoppedError, OmniDiffusionSamplingParams
from teaserve.server import build_app


@pytest.fixture(scope="module")
def servers(tiny_qwen, tmp_path_factory):
    """Both processes start side by side: importing torch and diffusers is most of what a test here costs."""
    started = {
        "drain": HeldServer(tiny_qwen, tmp_path_factory.mktemp("drain"), "--shutdown-grace", "60"),
        "force": HeldServer(tiny_qwen, tmp_path_factory.mktemp("force"), "--shutdown-grace", "600"),
    }
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def gauge(url, name) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not on /metrics")


def in_background(function, *args, **kwargs):
    """Start `function` in a thread; the returned callable joins it and gives its result (or raises its error)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args, **kwargs)
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result():
        thread.join(timeout=120)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    return result


def generate(url, seed, **extra):
    body = {"prompt": "a cat", "size": "32x32", "num_inference_steps": 2, "true_cfg_scale": 1.0, "seed": seed}
    body.update(extra)
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)


def error_events(response) -> list[dict]:
    data = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    return [event["error"] for event in data if "error" in event]


def assert_shutting_down(response):
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "shutting_down" and int(response.headers["retry-after"]) >= 1


def test_sigterm_lets_the_running_request_finish_and_refuses_the_rest(servers):
    server = servers["drain"]
    process, url = server.process, server.url
    running = in_background(generate, url, seed=1)
    wait_until(lambda: gauge(url, "teaserve_requests_running") == 1)
    waiting = in_background(generate, url, seed=2)
    waiting_stream = in_background(generate, url, seed=3, stream=True)
    wait_until(lambda: gauge(url, "teaserve_queue_depth") == 2)

    process.send_signal(signal.SIGTERM)
    assert_shutting_down(waiting())
    streamed = waiting_stream()  # admitted before the signal: its 200 went out, the refusal is an event
    assert streamed.status_code == 200 and [error["code"] for error in error_events(streamed)] == ["shutting_down"]
    assert_shutting_down(generate(url, seed=4))  # the port stays open during the drain: new requests hear why
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 503 and ready.json()["reason"] == "shutting_down"
    assert httpx.get(f"{url}/health").status_code == 200
    assert process.poll() is None

    server.hold.unlink()  # the running request may go on
    finished = running()
    assert finished.status_code == 200 and finished.json()["metrics"]["steps"] == 2
    assert decode_b64_image(finished.json()["data"][0]["b64_json"]).size == (32, 32)
    assert process.wait(timeout=30) == 0  # well within the 60 s grace period: it left once the work was done
    output = server.log.read_text()
    assert "shutting down" in output and "Traceback" not in output


def test_a_second_sigterm_exits_at_once(servers):
    process, url = servers["force"].process, servers["force"].url
    running = in_background(generate, url, seed=1)
    wait_until(lambda: gauge(url, "teaserve_requests_running") == 1)
    process.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{url}/ready").status_code == 503)
    assert process.poll() is None  # draining: the held request has 600 s
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == -signal.SIGTERM
    with pytest.raises(httpx.TransportError):
        running()


def test_past_the_grace_period_the_waiting_requests_are_answered_and_the_server_closes(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen))
    held = threading.Event()
    transformer = engine.model.pipeline.transformer
    hook = transformer.register_forward_pre_hook(lambda *_: held.wait(timeout=60))
    try:
        with RunningServer(build_app(engine), shutdown_grace=0.0) as server:
            running = in_background(generate, server.url, seed=1, stream=True)
            wait_until(lambda: engine.num_running == 1)
            waiting = in_background(generate, server.url, seed=2)
            wait_until(lambda: engine.queue_depth == 1)
            server.server.handle_exit(signal.SIGTERM, None)
            assert_shutting_down(waiting())
            streamed = running()  # the step never ends: the stream is told, and the server closes regardless
            assert [error["code"] for error in error_events(streamed)] == ["shutting_down"]
            server.thread.join(timeout=30)
            assert not server.thread.is_alive()
    finally:
        held.set()
        hook.remove()
    assert asyncio.run(engine.wait_stopped(timeout=30))  # released, the worker stops at its next step


def test_begin_shutdown_refuses_new_and_waiting_requests_and_the_running_one_finishes(tiny_qwen):
    engine, gate = AsyncEngine(str(tiny_qwen)), threading.Event()
    try:
        assert engine.seconds_since_progress is None  # idle
        params = OmniDiffusionSamplingParams(num_inference_steps=2, true_cfg_scale=1.0)
        running = engine.submit(engine.prepare("a", params), on_progress=lambda event: gate.wait(60))
        wait_until(lambda: engine.num_running == 1 and engine.seconds_since_progress is not None)
        waiting = [engine.submit(engine.prepare(prompt, params)) for prompt in ("b", "c")]
        engine.begin_shutdown()
        for handle in waiting:
            with pytest.raises(EngineStoppedError):
                handle.result(timeout=1)  # at once, not after the running request
        with pytest.raises(EngineStoppedError):
            engine.submit(engine.prepare("d", params))
        assert not engine.accepting and engine.is_alive
        gate.set()
        assert running.result(timeout=60).metrics.steps == 2
        assert engine.seconds_since_progress is None
        engine.shutdown(wait=False)
        assert asyncio.run(engine.wait_stopped(timeout=30))
    finally:
        gate.set()
        engine.shutdown()
