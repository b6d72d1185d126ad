"""A bounded cache of encoded prompts: the text encoder runs once per distinct text, not once per request."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from ..pipelines import TextEmbedding


class PromptEmbeddingCache:
    """Least-recently-used encoded prompts, keyed by (model name, the family's text encoder settings, text).

    Only the worker thread calls `get`; other threads (metrics) read `hits`, `misses` and `size`. Cached tensors
    are shared by every request with the same text, as they are (no copy per use), and nothing writes into them:
    the families hand them to diffusers' pipelines, which only read them into new tensors (Qwen-Image's
    `encode_prompt` repeats given embeddings per image; Flux's transformer projects them before anything else).
    `max_entries` 0 turns the cache off: every `get` computes.
    """

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, TextEmbedding] = OrderedDict()

    @property
    def size(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, compute: Callable[[], TextEmbedding | None]) -> TextEmbedding | None:
        """The cached value of `key`, else `compute()`'s, stored (its tensors detached) and counted as a miss.

        `compute` returning None means there is nothing to encode (a family that cannot encode a text alone):
        nothing is stored or counted.
        """
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key]
        computed = compute()
        if computed is None:
            return None
        value = tuple(None if tensor is None else tensor.detach() for tensor in computed)
        self.misses += 1
        if self.max_entries > 0:
            self._entries[key] = value
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value
