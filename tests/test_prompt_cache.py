"""The prompt-embedding cache: a bounded LRU in front of the text encoder, the same pixels as the pipelines' own
text encoding, and its hit and miss counts on /metrics."""

import numpy as np
import pytest
import torch
from conftest import RunningServer, metric, pixels
from PIL import Image

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.engine import AsyncEngine, PromptEmbeddingCache
from teaserve.server import build_app


def value(name: str) -> tuple[torch.Tensor]:
    return (torch.tensor([float(len(name))]),)


def test_least_recently_used_entry_goes_first():
    cache = PromptEmbeddingCache(2)
    computed = []

    def get(key):
        return cache.get(key, lambda: computed.append(key) or value(key))

    get("a"), get("bb"), get("a"), get("ccc")  # "bb" is now the least recently used: "ccc" pushes it out
    assert cache.size == 2 and computed == ["a", "bb", "ccc"]
    assert get("a") == value("a") and computed == ["a", "bb", "ccc"]
    assert get("bb") == value("bb") and computed == ["a", "bb", "ccc", "bb"]  # evicted: encoded again
    assert (cache.hits, cache.misses, cache.size) == (2, 4, 2)


def test_size_zero_computes_every_time_and_none_is_not_cached():
    cache = PromptEmbeddingCache(0)
    calls = []
    for _ in range(3):
        assert cache.get("a", lambda: calls.append(1) or value("a")) == value("a")
    assert (len(calls), cache.hits, cache.misses, cache.size) == (3, 0, 3, 0)
    cache = PromptEmbeddingCache(4)
    assert cache.get("edit", lambda: None) is None
    assert (cache.hits, cache.misses, cache.size) == (0, 0, 0)


def test_cached_tensors_are_detached():
    weight = torch.ones(2, requires_grad=True)
    (stored,) = PromptEmbeddingCache(1).get("a", lambda: (weight * 2,))
    assert not stored.requires_grad and torch.equal(stored, torch.full((2,), 2.0))


class EncoderCalls:
    """Counts forward calls of a pipeline's text encoder(s)."""

    def __init__(self, *encoders):
        self.count = 0
        self.handles = [encoder.register_forward_hook(self._called) for encoder in encoders]

    def _called(self, module, args, output):
        self.count += 1

    def since(self, before: int) -> int:
        return self.count - before


def generate(omni, prompt, **params):
    params = {"num_inference_steps": 3, "seed": 5, **params}
    return omni.generate(prompt, OmniDiffusionSamplingParams(**params))[0]


def same_pixels(first: list[Image.Image], second: list[Image.Image]) -> bool:
    return len(first) == len(second) and all(
        np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, second, strict=True)
    )


def text_path(omni, output, prompt, **kwargs):
    """The same generation through the diffusers pipeline, which encodes the texts itself."""
    with torch.inference_mode():
        return omni.model.pipeline(
            prompt=prompt,
            width=output.width,
            height=output.height,
            num_inference_steps=output.metrics.num_inference_steps,
            num_images_per_prompt=len(output.seeds),
            generator=[torch.Generator("cpu").manual_seed(seed) for seed in output.seeds],
            **kwargs,
        ).images


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    with Omni(model=str(tiny_qwen), cache_backend="none") as omni:
        yield omni


def test_qwen_image_encodes_each_text_once(qwen):
    cache, calls = qwen.engine.prompt_cache, EncoderCalls(qwen.model.pipeline.text_encoder)
    hits, misses, before = cache.hits, cache.misses, calls.count
    first = generate(qwen, "a red squirrel")  # true CFG with the blank negative prompt by default
    assert calls.since(before) == 2 and (cache.hits - hits, cache.misses - misses) == (0, 2)
    before = calls.count
    again = generate(qwen, "a red squirrel")
    assert calls.since(before) == 0 and (cache.hits - hits, cache.misses - misses) == (2, 2)
    assert same_pixels(first.images, again.images)  # the cached inference tensors serve a later pipeline call
    before = calls.count
    generate(qwen, "a blue squirrel")
    assert calls.since(before) == 1 and (cache.hits - hits, cache.misses - misses) == (3, 3)  # the negative: a hit
    before = calls.count
    generate(qwen, "a green squirrel", true_cfg_scale=1.0)  # no true CFG: the negative prompt is not encoded
    assert calls.since(before) == 1 and (cache.hits - hits, cache.misses - misses) == (3, 4)


def test_qwen_image_pixels_match_the_pipelines_text_encoding(qwen, tiny_qwen):
    for params in ({"num_outputs_per_prompt": 2}, {"negative_prompt": "bad quality", "true_cfg_scale": 2.5}, {}):
        for _ in range(2):  # a miss, then a hit
            output = generate(qwen, "a cat", **params)
            negative = params.get("negative_prompt", " ")
            expected = text_path(
                qwen, output, "a cat", negative_prompt=negative, true_cfg_scale=params.get("true_cfg_scale", 4.0)
            )
            assert same_pixels(output.images, expected)
    with Omni(model=str(tiny_qwen), cache_backend="none", prompt_cache_size=0) as uncached:
        first, second = generate(uncached, "a cat"), generate(uncached, "a cat")
        assert uncached.engine.prompt_cache.size == 0 and uncached.engine.prompt_cache.hits == 0
    assert same_pixels(first.images, generate(qwen, "a cat").images)
    assert same_pixels(second.images, first.images)


@pytest.fixture(scope="module")
def flux(tiny_flux):
    with Omni(model=str(tiny_flux), cache_backend="none") as omni:
        yield omni


def test_flux_pixels_match_the_pipelines_text_encoding(flux):
    pipe = flux.model.pipeline
    calls = EncoderCalls(pipe.text_encoder, pipe.text_encoder_2)  # CLIP and T5
    cache = flux.engine.prompt_cache
    cases = [
        ("a dog", {"num_outputs_per_prompt": 2}, {"guidance_scale": 3.5}),
        (
            "a red dog",  # true CFG: two encodings per request
            {"negative_prompt": "blurry", "true_cfg_scale": 2.0, "num_outputs_per_prompt": 2},
            {"guidance_scale": 3.5, "negative_prompt": "blurry", "true_cfg_scale": 2.0},
        ),
    ]
    for prompt, params, kwargs in cases:
        texts = 2 if "negative_prompt" in params else 1
        hits, misses = cache.hits, cache.misses
        for _ in range(2):
            before = calls.count
            output = generate(flux, prompt, width=32, height=32, **params)
            encoded = calls.since(before)
            assert same_pixels(output.images, text_path(flux, output, prompt, **kwargs))
        assert encoded == 0  # the second time, every text came from the cache
        assert (cache.hits - hits, cache.misses - misses) == (texts, texts)


def test_flux_kontext_encodes_its_prompt_through_the_cache(tiny_kontext, small_edits):
    request = {"prompt": "make it blue", "multi_modal_data": {"image": Image.new("RGB", (40, 56), (200, 40, 40))}}
    with Omni(model=str(tiny_kontext), cache_backend="none") as kontext:
        first, again = generate(kontext, request), generate(kontext, request)
        assert (kontext.engine.prompt_cache.misses, kontext.engine.prompt_cache.hits) == (1, 1)
    with Omni(model=str(tiny_kontext), cache_backend="none", prompt_cache_size=0) as uncached:
        assert same_pixels(first.images, generate(uncached, request).images)
    assert same_pixels(first.images, again.images)


def test_edit_models_encode_their_prompts_in_the_pipeline(tiny_edit, small_edits):
    image = Image.new("RGB", (32, 32), (10, 200, 30))
    with Omni(model=str(tiny_edit), cache_backend="none") as edit:
        calls = EncoderCalls(edit.model.pipeline.text_encoder)
        first = generate(edit, {"prompt": "make it dance", "multi_modal_data": {"image": image}})
        again = generate(edit, {"prompt": "make it dance", "multi_modal_data": {"image": image}})
        cache = edit.engine.prompt_cache
        assert (cache.hits, cache.misses, cache.size) == (0, 0, 0)
        assert calls.count == 4  # prompt and negative prompt, with the image, in each pipeline call
        assert same_pixels(first.images, again.images)


def test_metrics_count_prompt_cache_hits_and_misses(tiny_qwen):
    engine = AsyncEngine(str(tiny_qwen), cache_backend="none")
    with RunningServer(build_app(engine)) as server:
        client = server.client()
        for prompt in ("a cat", "a cat", "a dog"):
            client.images.generate(prompt=prompt, extra_body={"num_inference_steps": 2, "seed": 1})
        # a cat and the blank negative prompt, a cat again (2 hits), a dog (1 miss, the negative's hit)
        assert metric(server, "teaserve_prompt_cache_misses_total") == 3
        assert metric(server, "teaserve_prompt_cache_hits_total") == 3
