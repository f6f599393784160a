"""Lru: a small least-recently-used cache of things made once per key (device index tensors, norm row owners,
histogram layouts), bounded so that a run over many parameter sets keeps only the recent ones."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, Optional, TypeVar

_V = TypeVar("_V")


class Lru(Generic[_V]):
    """At most ``maxsize`` values, the least recently used dropped first."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, _V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Optional[_V]:
        """The value kept for ``key`` (now the most recently used), else ``None``."""
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def get_or_make(self, key: Hashable, make: Callable[[], _V]) -> _V:
        """The value kept for ``key``, else ``make()`` kept for it (dropping the least recently used beyond
        ``maxsize``); either way now the most recently used."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = self._items[key] = make()
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()
