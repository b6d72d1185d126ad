"""What a server needs of an engine: `EngineClient`. `AsyncEngine` is the one in this process; a client of engines
in other processes (scale-out replicas) is another. The server depends on this interface only."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from ..cache import CacheBackend
from ..cache.base import QUALITY_TARGET
from .images import ImageSource
from .params import OmniDiffusionSamplingParams
from .request import ProgressEvent, PromptInput, RequestOutput

if TYPE_CHECKING:
    from ..pipelines import LoadedModel


@dataclass(frozen=True)
class ServedCache:
    """The cache backend requests run with, as far as a request can tune it (its `cache_config`)."""

    backend: str
    request_keys: tuple[str, ...]
    """The keys a request's cache_config may carry; `quality_target` only where the backend has a calibrated
    quality table to choose its tuning value from."""
    tuning_key: str | None
    """The key that trades speed for quality (larger = faster)."""
    defaults: dict[str, Any]
    """The value of each request key other than `enabled` for a request that leaves it out."""
    quality_target: float | None
    """The quality target (mean PSNR in dB against uncached) that chooses the tuning value of a request that sets
    neither; None: the tuning value's default applies."""

    @classmethod
    def of(cls, backend: CacheBackend) -> ServedCache:
        calibrated = backend.tuning_key is not None and backend.quality.table is not None
        return cls(
            backend=backend.name,
            request_keys=(*backend.request_keys, QUALITY_TARGET) if calibrated else backend.request_keys,
            tuning_key=backend.tuning_key,
            defaults=backend.request_defaults(),
            quality_target=backend.quality.target,
        )


@dataclass(frozen=True)
class ServedModel:
    """What a client knows of the model it serves without holding it."""

    name: str
    source: str
    architecture: str
    can_edit: bool
    max_input_images: int
    default_size: tuple[int, int]
    makes_video: bool
    cache: ServedCache

    @classmethod
    def of(cls, model: LoadedModel, cache: CacheBackend) -> ServedModel:
        return cls(
            name=model.name,
            source=model.source,
            architecture=model.architecture,
            can_edit=model.family.can_edit,
            max_input_images=model.family.max_input_images,
            default_size=model.default_size,
            makes_video=model.family.makes_video,
            cache=ServedCache.of(cache),
        )


class CacheCounts(Protocol):
    """Look-ups of the encoded-prompt cache."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...


class Generation(Protocol):
    """A request an engine has taken: its resolved size, its progress and its output."""

    @property
    def request_id(self) -> str: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def events(self) -> AsyncGenerator[ProgressEvent | RequestOutput, None]:
        """The progress events (when asked for at the start), then the output; leaving early cancels the request."""
        ...

    async def output(self) -> RequestOutput:
        """The output; cancelling the awaiting task cancels the request."""
        ...

    def cancel(self) -> None: ...


class EngineClient(Protocol):
    """An engine as the server sees it. Refusals raise the engine's errors: InvalidParameterError (a bad request,
    naming the parameter), QueueFullError (busy, with retry_after), EngineStoppedError (shutting down); failures
    while running raise GenerationError and its kinds."""

    @property
    def served_model(self) -> ServedModel: ...

    @property
    def is_alive(self) -> bool:
        """A model worker is there to run requests."""
        ...

    @property
    def accepting(self) -> bool:
        """False once shutting down: new requests are refused."""
        ...

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a model worker."""
        ...

    @property
    def num_running(self) -> int: ...

    @property
    def seconds_since_progress(self) -> float | None:
        """None while some worker is idle; else seconds since the running requests last advanced."""
        ...

    @property
    def running_request_id(self) -> str | None: ...

    @property
    def prompt_cache(self) -> CacheCounts: ...

    async def read_inputs(
        self, params: OmniDiffusionSamplingParams, images: list[BinaryIO], mask: BinaryIO | None
    ) -> tuple[list[ImageSource], ImageSource | None]:
        """An edit's uploaded images and mask, ready to go into a PromptInput (refusals raise
        InvalidParameterError); called while the uploads are open."""
        ...

    async def start(
        self,
        prompt: PromptInput,
        params: OmniDiffusionSamplingParams,
        *,
        num_previews: int = 0,
        request_id: str | None = None,
        progress: bool = False,
    ) -> Generation:
        """Prepare and queue a request; returns once a worker has taken it. With progress=True its `events` carry
        the progress events too."""
        ...

    def begin_shutdown(self) -> None: ...

    def shutdown(self, *, wait: bool = True) -> None: ...

    async def wait_stopped(self, timeout: float | None = None) -> bool: ...
