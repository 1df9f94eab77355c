"""Which subjects a data-loading process keeps in RAM: the hottest, within a byte budget.

Training visits every subject of a shard once per pass, in a fresh random order. A
least-recently-used cache smaller than the shard then never hits (each subject is evicted
before its next visit comes round); this cache instead keeps a stable set. Every visit is
counted, cached or not; a subject that does not fit in the free budget is admitted only
by evicting subjects visited at least `margin` times less often than it. With uniform visits
the counts never drift that far apart, so the first subjects to fill the budget stay and
the hit rate is budget / shard size; a subject that really is visited more often (a
smaller shard, a weighted sampler) displaces colder ones. Subjects that are not cached are
read straight from their chunks (`chunk_reader`), which is what makes a dataset bigger
than RAM train at a useful speed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

__all__ = ["SubjectCache"]


class SubjectCache:
    """Level arrays of the hottest subjects, bounded by their total bytes.

    Args:
        max_bytes: the budget (0 caches nothing).
        margin: how many more visits a subject needs than a cached one to displace it.
    """

    def __init__(self, max_bytes: int, margin: int = 2):
        self.max_bytes = int(max_bytes)
        self.margin = int(margin)
        self.visits: Counter = Counter()
        self._items: dict[str, tuple[np.ndarray, ...]] = {}
        self._sizes: dict[str, int] = {}

    @property
    def bytes(self) -> int:
        """Bytes held now (never above `max_bytes`)."""
        return sum(self._sizes.values())

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def visit(self, key: str) -> None:
        """Count one visit of `key` (call once per visit, cached or not)."""
        self.visits[key] += 1

    def get(self, key: str) -> tuple[np.ndarray, ...] | None:
        return self._items.get(key)

    def admits(self, key: str, size: int) -> bool:
        """Whether `key` (of `size` bytes) should be cached now; evicts colder subjects if so."""
        if key in self._items or size > self.max_bytes:
            return False
        free = self.max_bytes - self.bytes
        if size <= free:
            return True
        colder = sorted((self.visits[k], k) for k in self._items if self.visits[k] + self.margin <= self.visits[key])
        if free + sum(self._sizes[k] for _, k in colder) < size:
            return False
        for _, victim in colder:
            if free >= size:
                break
            free += self._sizes.pop(victim)
            del self._items[victim]
        return True

    def put(self, key: str, value: tuple[Any, ...]) -> None:
        """Cache `value` for `key`; call after `admits` said yes."""
        size = sum(v.nbytes for v in value)
        if size > self.max_bytes - self.bytes:
            return
        self._items[key] = value
        self._sizes[key] = size
