"""What a server needs of an engine: `EngineClient`. `AsyncEngine` is the one in this process; a client of engines
in other processes (scale-out replicas) is another. The server depends on this interface only."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Protocol

from .images import ImageSource
from .params import OmniDiffusionSamplingParams
from .request import ProgressEvent, PromptInput, RequestOutput

if TYPE_CHECKING:
    from ..pipelines import LoadedModel


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

    @classmethod
    def of(cls, model: LoadedModel) -> ServedModel:
        return cls(
            name=model.name,
            source=model.source,
            architecture=model.architecture,
            can_edit=model.family.can_edit,
            max_input_images=model.family.max_input_images,
            default_size=model.default_size,
            makes_video=model.family.makes_video,
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
