"""`Omni`: the blocking Python face of the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..pipelines import LoadedModel
from .args import EngineArgs
from .async_engine import AsyncEngine
from .params import OmniDiffusionSamplingParams
from .request import ProgressEvent, PromptInput, RequestOutput

PromptLike = str | dict[str, Any] | PromptInput


class Omni:
    """Load a model once and generate images or videos with it.

    >>> omni = Omni(model="Qwen/Qwen-Image", cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.2})
    >>> outputs = omni.generate("a cat", OmniDiffusionSamplingParams(num_inference_steps=50))
    >>> outputs[0].images[0].save("cat.png")

    A video model's outputs carry `videos` instead (frames, fps, `.mp4()`):

    >>> omni = Omni(model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", cache_backend="tea_cache")
    >>> (output,) = omni.generate("a fox running", OmniDiffusionSamplingParams(num_frames=33, fps=16))
    >>> Path("fox.mp4").write_bytes(output.videos[0].mp4())

    `model=None` is the embedded default model. `cache_backend=None` reads $DIFFUSION_CACHE_BACKEND
    (default "none"). `device`/`dtype` default to cuda + bfloat16 when a GPU is present, else cpu + float32.
    Further keywords are EngineArgs fields (limits, `max_queue_size`, `request_timeout`); `model` may also be
    an EngineArgs.
    """

    def __init__(
        self,
        model: str | Path | LoadedModel | EngineArgs | None = None,
        cache_backend: str | None = None,
        cache_config: dict[str, Any] | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **settings: Any,
    ):
        named = {"cache_backend": cache_backend, "cache_config": cache_config, "device": device, "dtype": dtype}
        self.engine = AsyncEngine(model, **{k: v for k, v in named.items() if v is not None}, **settings)

    @property
    def model(self) -> LoadedModel:
        return self.engine.model

    def generate(
        self,
        prompts: PromptLike | list[PromptLike],
        params: OmniDiffusionSamplingParams | None = None,
        *,
        on_progress=None,
    ) -> list[RequestOutput]:
        """One output per prompt, in order. Every prompt is validated before anything runs."""
        items = prompts if isinstance(prompts, list) else [prompts]
        requests = [self.engine.prepare(item, params) for item in items]
        handles = [self.engine.submit(request, block=True, on_progress=on_progress) for request in requests]
        return [handle.result() for handle in handles]

    def close(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> Omni:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Omni", "ProgressEvent"]
