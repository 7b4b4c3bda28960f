"""A small cache of built lattices, held by whoever reuses them (never global).

A spatial kernel's features are the pixel positions divided by its bandwidth: its lattice and normaliser
depend only on the image size and that bandwidth, so a folder of same-size images, or a training run on one
crop size, can build them once. The objects cached are never changed after they are built.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

__all__ = ["LatticeCache"]

V = TypeVar("V")


class LatticeCache:
    """At most ``size`` built objects, the least recently used dropped first.

    ``get(key, build)`` returns the object built for ``key``, calling ``build()`` the first time. A key must
    name everything the object depends on (shape, bandwidths, dtype, device, backend)."""

    def __init__(self, size: int = 2):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def clear(self) -> None:
        self._items.clear()

    def __repr__(self) -> str:
        return f"LatticeCache(size={self.size}, held={len(self._items)})"
