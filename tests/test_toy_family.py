"""A new model family with TeaCache is one module (tests/toy_family.py) that registers itself: served over HTTP."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import toy_family
from conftest import RunningServer
from PIL import Image

from teaserve.engine import AsyncEngine
from teaserve.server import build_app


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory):
    folder = toy_family.build_toy_model(tmp_path_factory.mktemp("toy"))
    engine = AsyncEngine(folder, cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.3})
    with RunningServer(build_app(engine)) as server:
        yield server


def generate(server, **extra):
    result = server.client().images.generate(prompt="a toy", size="32x24", extra_body={"seed": 3, **extra})
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    return result, np.asarray(image, dtype=np.int16)


def test_the_toy_family_is_served_with_teacache(toy_server):
    (card,) = toy_server.client().models.list().data
    assert card.model_extra["architecture"] == toy_family.ARCHITECTURE

    cached, cached_pixels = generate(toy_server)
    assert cached_pixels.shape == (24, 32, 3)
    branch = cached.model_extra["cache"]["branches"]["cond"]
    assert len(branch["schedule"]) == 12 and branch["schedule"][0] == branch["schedule"][-1] == "C"
    assert 0 < branch["skipped_steps"] < 10, branch["schedule"]

    uncached, uncached_pixels = generate(toy_server, cache_config={"enabled": False})
    assert uncached.model_extra["metrics"]["transformer_calls"] == 12
    # Skipping reuses the residual of the last computed step: close to, not equal to, the uncached image.
    difference = np.abs(cached_pixels - uncached_pixels)
    assert 0 < difference.mean() < 8

    # A threshold below every change computes each step: exactly the uncached image.
    exact, exact_pixels = generate(toy_server, cache_config={"rel_l1_thresh": 1e-9})
    assert exact.model_extra["cache"]["branches"]["cond"]["schedule"] == "C" * 12
    np.testing.assert_array_equal(exact_pixels, uncached_pixels)
