"""DramPool: a node's checkpoints kept in host memory, LRU, with reference counts.

A hit hands out the very tensors loaded before (zero-copy views into one buffer):
no I/O, no copy. An entry that is leased is never evicted. The pool stays within
its byte budget except while leases pin more than fits; as those leases end, the
least recently used unleased entries go until it fits again (so an entry bigger
than the whole budget lives exactly as long as it is leased).

An entry may be inserted while its bytes are still arriving (a streaming load): its
leases carry the load's LoadProgress until the load completes, and a load that
fails is discarded from the pool.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ember.store.loader import LoadProgress


@dataclass
class _Entry:
    tensors: dict[str, torch.Tensor]
    nbytes: int
    refs: int = 0
    loading: LoadProgress | None = None


class PoolLease:
    """The right to use one pool entry's tensors until `release()` (idempotent).
    Use as a context manager, or release explicitly. `loading` is the LoadProgress of
    tensors still arriving (wait on it before reading them), None once they are in."""

    def __init__(
        self,
        key: str,
        tensors: dict[str, torch.Tensor],
        nbytes: int,
        pool: DramPool | None,
        loading: LoadProgress | None = None,
        entry: object = None,
    ) -> None:
        self.key = key
        self._entry = entry  # which entry of `key` this leases (a discarded one may be replaced)
        self.tensors = tensors
        self.nbytes = nbytes
        self.loading = loading
        self._pool = pool
        self._released = False
        self._lock = threading.Lock()

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        if self._pool is not None:
            self._pool._release(self.key, self._entry)

    def __enter__(self) -> PoolLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"PoolLease({self.key!r}, {self.nbytes} bytes, {state})"


class DramPool:
    """Checkpoints in host memory, keyed by name, within `budget_bytes`. Thread-safe.
    `on_evict(key)` runs (outside the pool's lock) after an entry leaves the pool."""

    def __init__(self, budget_bytes: int, *, on_evict: Callable[[str], None] | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._on_evict = on_evict
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._used = 0
        self._lock = threading.Lock()

    def acquire(self, key: str) -> PoolLease | None:
        """The entry's tensors, leased and moved to most recently used; None on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            return self._lease(key, entry)

    def insert(
        self, key: str, tensors: dict[str, torch.Tensor], nbytes: int, *, loading: LoadProgress | None = None
    ) -> PoolLease:
        """Add an entry and lease it. Unleased entries are evicted, least recently used
        first, to make room. If `key` is already present (another thread loaded it
        first), the existing entry is leased and `tensors` are dropped. `loading`: the
        tensors are still arriving (see LoadProgress)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(dict(tensors), nbytes, loading=loading)
                self._entries[key] = entry
                self._used += nbytes
            lease = self._lease(key, entry)
            evicted = self._shrink()
        self._notify(evicted)
        return lease

    def evict(self, key: str) -> bool:
        """Drop an unleased entry; False if it is absent or leased."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.refs > 0:
                return False
            self._drop(key)
        self._notify([key])
        return True

    def discard(self, key: str, loading: LoadProgress | None = None) -> bool:
        """Drop an entry even while leased (its load failed: nobody may lease it again;
        held leases keep their memory until released). With `loading`, only the entry
        of that load. False if absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (loading is not None and entry.loading is not loading):
                return False
            self._drop(key)
        self._notify([key])
        return True

    def keys(self) -> dict[str, int]:
        """Key -> bytes held, least recently used first."""
        with self._lock:
            return {k: e.nbytes for k, e in self._entries.items()}

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def refs(self, key: str) -> int:
        """How many leases of `key` are held (0 if absent)."""
        with self._lock:
            entry = self._entries.get(key)
            return 0 if entry is None else entry.refs

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def _lease(self, key: str, entry: _Entry) -> PoolLease:
        entry.refs += 1
        self._entries.move_to_end(key)
        if entry.loading is not None and entry.loading.complete:
            entry.loading = None
        # A fresh dict of the same tensor objects: callers may edit the mapping, never the pool's.
        return PoolLease(key, dict(entry.tensors), entry.nbytes, self, entry.loading, entry)

    def _release(self, key: str, token: object) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry is not token:
                return
            entry.refs -= 1
            evicted = self._shrink()
        self._notify(evicted)

    def _shrink(self) -> list[str]:
        """Evict unleased entries, least recently used first, until within budget."""
        evicted = []
        for key in list(self._entries):
            if self._used <= self.budget_bytes:
                break
            if self._entries[key].refs == 0:
                self._drop(key)
                evicted.append(key)
        return evicted

    def _drop(self, key: str) -> None:
        self._used -= self._entries.pop(key).nbytes

    def _notify(self, keys: list[str]) -> None:
        if self._on_evict is not None:
            for key in keys:
                self._on_evict(key)
