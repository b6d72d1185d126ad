"""teaserve on Ray Serve: two CPU replicas of the embedded model behind the same HTTP API, on a Ray instance of
this process bound to loopback (usage stats off, the auth token in the environment, the temp folder removed)."""

import asyncio
import contextlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import decode_b64_image, metric, pixels, png_bytes, wait_until
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed (pip install 'teaserve[ray]')"
)

SETTINGS = {
    "cache_backend": "tea_cache",
    "replicas": 2,
    "replica_cpus": 1,
    "max_batch_size": 1,  # each replica takes one request at a time
    "max_queue_size": 1,  # and one more may wait for a replica
    "max_steps": 1000,
}
LONG = {"num_inference_steps": 1000, "cache_config": {"enabled": False}}
"""A request that runs for tens of seconds: a client who leaves it must not wait for it."""
SHORT_STEPS = 6


class RayServer:
    def __init__(self, url: str):
        self.url = url

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, **kwargs)

    def replicas(self, name: str) -> dict[str, float]:
        """replica -> value of a per-replica series on /metrics."""
        text = httpx.get(f"{self.url}/metrics").text
        return {
            sample.labels["replica"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        }

    def pids(self) -> dict[str, int]:
        text = httpx.get(f"{self.url}/metrics").text
        return {
            sample.labels["replica"]: int(sample.labels["pid"])
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "teaserve_replica_info"
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server():
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray process on loopback only
        environment.setenv("RAY_USAGE_STATS_ENABLED", "0")
        environment.setenv("RAY_AUTH_MODE", "token")
        environment.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))  # no ~/.ray/auth_token is written
        import ray
        from ray import serve

        from teaserve.scale.app import application

        ray.init(
            address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, logging_level=logging.WARNING
        )
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(application(SETTINGS), name="teaserve", route_prefix="/")
            server = RayServer(f"http://127.0.0.1:{port}")
            wait_until(lambda: len(server.pids()) == 2, timeout=60)  # the ingress has heard from both replicas
            yield server
        finally:
            serve.shutdown()
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)


def generate_body(seed: int, **extra) -> dict:
    return {"prompt": f"shape {seed}", "seed": seed, "num_inference_steps": SHORT_STEPS, **extra}


def image_of(result) -> np.ndarray:
    return pixels(decode_b64_image(result.data[0].b64_json))


def completed(server: RayServer) -> dict[str, float]:
    return server.replicas("teaserve_replica_requests_completed_total")


def test_requests_spread_over_both_replicas_and_match_their_serial_regeneration(ray_server):
    seeds = range(3)  # one running on each replica, one waiting: all the deployment holds
    before = completed(ray_server)

    async def concurrently():
        async with openai.AsyncOpenAI(base_url=f"{ray_server.url}/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(
                *(client.images.generate(prompt=f"shape {seed}", extra_body=generate_body(seed)) for seed in seeds)
            )

    results = asyncio.run(concurrently())
    assert [result.data[0].model_extra["seed"] for result in results] == list(seeds)
    assert {result.model_extra["cache"]["backend"] for result in results} == {"tea_cache"}
    wait_until(lambda: sum(completed(ray_server).values()) == sum(before.values()) + len(seeds), timeout=30)
    after = completed(ray_server)
    assert len(after) == 2
    assert all(after[replica] > before.get(replica, 0) for replica in after)  # each replica answered some

    client = ray_server.client()
    for seed, result in zip(seeds, results, strict=True):
        alone = client.images.generate(prompt=f"shape {seed}", extra_body=generate_body(seed))
        assert np.array_equal(image_of(alone), image_of(result))


def test_bad_input_is_refused_by_a_replica_with_a_400_naming_the_parameter(ray_server):
    client = ray_server.client()
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(prompt="a circle", extra_body=generate_body(0, num_frames=9))
    assert refused.value.body["param"] == "num_frames"
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(image=("a.png", png_bytes(Image.new("RGB", (64, 64))), "image/png"), prompt="x")
    assert refused.value.body["param"] == "image" and "text only" in refused.value.body["message"]
    (card,) = client.models.list().data
    assert card.id == "teaserve/shapes-qwen-image" and card.model_extra["default_size"] == "64x64"
    assert card.model_extra["cache"]["backend"] == "tea_cache"  # the replicas' report of their backend
    ready = httpx.get(f"{ray_server.url}/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    videos = httpx.post(f"{ray_server.url}/v1/videos", json={"prompt": "a circle"})
    assert videos.status_code == 501 and "one process" in videos.json()["error"]["message"]


def stream_request(client: httpx.Client, seed: int, **extra) -> httpx.Response:
    """A streamed generation, sent; it returns once a replica has taken it (the headers come after admission)."""
    request = client.build_request(
        "POST", "/v1/images/generations", json={**generate_body(seed, **extra), "stream": True}
    )
    response = client.send(request, stream=True)
    assert response.status_code == 200, response.read()
    return response


def test_overflow_is_a_429_with_retry_after_and_a_client_leaving_cancels_its_generation(ray_server):
    url, outcome = ray_server.url, {}
    with httpx.Client(base_url=url, timeout=60) as holders:
        held = [stream_request(holders, seed, **LONG) for seed in (1, 2)]  # both replicas busy for long
        assert metric(ray_server, "teaserve_requests_running") == 2

        def waiting_request() -> None:
            with contextlib.suppress(httpx.TimeoutException):  # then the assertion below says what went wrong
                outcome["response"] = httpx.post(f"{url}/v1/images/generations", json=generate_body(3), timeout=30)

        waiting = threading.Thread(target=waiting_request)
        waiting.start()
        wait_until(lambda: metric(ray_server, "teaserve_queue_depth") == 1, timeout=30)

        for body in (generate_body(4), generate_body(5, stream=True)):
            refused = httpx.post(f"{url}/v1/images/generations", json=body, timeout=30)
            assert refused.status_code == 429
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
        for response in held:
            response.close()  # the clients leave: their replicas must stop and take the waiting request

    waiting.join(timeout=60)
    assert "response" in outcome, "the waiting request got no replica: the replicas went on with the left requests"
    assert outcome["response"].status_code == 200
    wait_until(lambda: set(ray_server.replicas("teaserve_replica_requests_running").values()) == {0}, timeout=30)
    assert metric(ray_server, "teaserve_requests_total", endpoint="generations", status="429") == 2


def events_of(response: httpx.Response) -> list[dict]:
    import json

    return [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]


def test_a_killed_replica_fails_only_its_own_request_and_is_replaced(ray_server):
    pids = ray_server.pids()
    assert len(pids) == 2
    with httpx.Client(base_url=ray_server.url, timeout=120) as client:
        running = [
            stream_request(client, seed, num_inference_steps=200, cache_config={"enabled": False}) for seed in (7, 8)
        ]
        victim = next(iter(pids))
        os.kill(pids[victim], signal.SIGKILL)
        outcomes = [events_of(response)[-1] for response in running]
    failed = [event for event in outcomes if "error" in event]
    finished = [event for event in outcomes if event.get("type") == "image_generation.completed"]
    assert len(failed) == 1 and len(finished) == 1
    assert failed[0]["error"]["code"] == "worker_lost"
    assert decode_b64_image(finished[0]["b64_json"]).size == (64, 64)

    wait_until(lambda: len(ray_server.pids()) == 2 and victim not in ray_server.pids(), timeout=180)
    client = ray_server.client()
    after = [client.images.generate(prompt="again", extra_body=generate_body(seed)) for seed in (9, 10)]
    assert [result.data[0].model_extra["seed"] for result in after] == [9, 10]


def test_serve_options_of_the_engine_replicas():
    from teaserve.engine import EngineArgs
    from teaserve.scale.app import engine_options
    from teaserve.scale.settings import ScaleSettings

    fixed = engine_options(
        ScaleSettings(replicas=3, replica_cpus=2, replica_gpus=1, engine=EngineArgs(max_batch_size=4))
    )
    assert fixed == {
        "num_replicas": 3,
        "max_ongoing_requests": 4,  # a replica takes a whole batch; the ingress keeps the waiting ones
        "ray_actor_options": {"num_cpus": 2, "num_gpus": 1},
        "graceful_shutdown_timeout_s": 30.0,
    }
    autoscaled = engine_options(ScaleSettings(min_replicas=2, max_replicas=8, shutdown_grace=5, replica_gpus=0))
    assert autoscaled["num_replicas"] == "auto" and autoscaled["graceful_shutdown_timeout_s"] == 5
    assert autoscaled["autoscaling_config"] == {
        "min_replicas": 2,
        "initial_replicas": None,
        "max_replicas": 8,
        "target_ongoing_requests": EngineArgs().max_batch_size,
    }


def test_the_documented_config_file_is_a_serve_config_of_valid_teaserve_settings():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from teaserve.scale.settings import ScaleSettings

    text = (Path(__file__).resolve().parents[1] / "docs" / "scale-out.md").read_text()
    config = ServeDeploySchema.model_validate(yaml.safe_load(text.split("```yaml\n")[1].split("```")[0]))
    (app,) = config.applications
    assert app.import_path == "teaserve.scale.app:application"
    assert [deployment.name for deployment in app.deployments] == ["Engine"]
    settings = ScaleSettings.from_options(app.args)
    assert settings.autoscaling and (settings.min_replicas, settings.max_replicas) == (2, 8)
    assert settings.engine.cache_config == {"rel_l1_thresh": 0.2} and settings.engine.request_timeout == 600
