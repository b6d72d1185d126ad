"""What a request may put in `cache_config`, over HTTP: knobs only, bounded; never a file or coefficients."""

import json

import httpx
import openai
import pytest
from conftest import RunningServer

from teaserve.engine import AsyncEngine
from teaserve.server import build_app


@pytest.fixture(scope="module")
def server(tiny_qwen, tmp_path_factory):
    secret = tmp_path_factory.mktemp("server-side") / "profile.json"
    secret.write_text(json.dumps({"coefficients": [0, 0, 0, 1, 0], "x_range": [0.01, 1.0], "password": "hunter2"}))
    engine = AsyncEngine(str(tiny_qwen), cache_backend="tea_cache")
    with RunningServer(build_app(engine)) as server:
        server.secret = secret
        yield server


def generate(server, cache_config, **body):
    extra = {"seed": 0, "num_inference_steps": 4, "cache_config": cache_config, **body}
    return server.client().images.generate(prompt="a cat", size="32x32", extra_body=extra)


@pytest.mark.parametrize(
    "cache_config",
    [
        {"coefficients_file": "SECRET"},
        {"coefficients_file": "/etc/passwd"},
        {"coefficients": [0, 0, 0, 1, 0]},
        {"coefficients": [1e308] * 5},
        {"x_range": [0, 1]},
    ],
)
def test_coefficients_and_files_are_server_settings_only(server, cache_config):
    if cache_config.get("coefficients_file") == "SECRET":
        cache_config = {"coefficients_file": str(server.secret)}
    with pytest.raises(openai.BadRequestError) as error:
        generate(server, cache_config)
    body = error.value.body
    assert body["param"] == "cache_config"
    assert "valid keys for a request: enabled, rel_l1_thresh, max_consecutive_skips" in body["message"]
    for leak in ("hunter2", "/etc", "root:", str(server.secret.parent)):
        assert leak not in error.value.response.text


@pytest.mark.parametrize(
    "cache_config",
    [{"rel_l1_thresh": 10**400}, {"rel_l1_thresh": 1e308}, {"rel_l1_thresh": 0}, {"max_consecutive_skips": 10**400}],
)
def test_out_of_range_numbers_are_a_400_not_a_500(server, cache_config):
    with pytest.raises(openai.BadRequestError) as error:
        generate(server, cache_config)
    assert error.value.body["param"] == "cache_config"
    assert next(iter(cache_config)) in error.value.body["message"]


def test_statistics_are_plain_json_numbers_even_at_the_largest_threshold(server):
    result = generate(server, {"rel_l1_thresh": 1e9, "max_consecutive_skips": 10_000})
    cache = result.model_extra["cache"]
    assert cache["branches"]["cond"]["schedule"] == "CSSC"
    raw = httpx.post(
        f"{server.url}/v1/images/generations",
        json={"prompt": "a cat", "size": "32x32", "num_inference_steps": 4, "cache_config": {"rel_l1_thresh": 1e9}},
        timeout=60,
    )
    assert raw.status_code == 200
    json.loads(raw.text, parse_constant=lambda name: pytest.fail(f"{name} in the response"))
