"""LRU cache of prompt embeddings, so a reroll of the same prompt skips the text encoders."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from engine.families import Embeds


class PromptEmbedCache:
    """Maps (prompt, sequence length, active text-encoder LoRAs) to the encoders' output tensors."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, Embeds] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_encode(self, key: Hashable, encode: Callable[[], Embeds]) -> tuple[Embeds, bool]:
        """The cached embeds for `key` (True) or freshly encoded ones (False)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key], True
        embeds = {k: v.detach() for k, v in encode().items()}
        with self._lock:
            self.misses += 1
            if self.capacity > 0:
                self._items[key] = embeds
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return embeds, False

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
