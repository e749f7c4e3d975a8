"""A bounded store that forgets its least recently used entry first.

One implementation for the project's caches: image prefixes (:class:`model.decoding.PrefixCache`),
static KV caches (:class:`model.decoding.GreedyDecoder`), encoder features
(:class:`model.image_cache.FeatureCache`) and packed-attention plans
(:mod:`model.vision_attention`). Not thread-safe: a store shared across threads is locked by its
owner (``FeatureCache`` holds a lock around more than the store itself).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

__all__ = ["LRU"]


class LRU(Generic[K, V]):
    """At most ``max_items`` entries (0: none are kept); :meth:`get` and :meth:`put` make an entry
    the most recently used. ``max_items`` may be changed; the next :meth:`put` applies it."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, default=None):
        """The value stored under ``key``, or ``default`` when there is none."""
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: K, value: V) -> None:
        """Store ``value`` under ``key``, then forget the oldest entries beyond ``max_items``."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
