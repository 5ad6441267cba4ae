"""DiskCache: a node's copies of registry checkpoints, `$EMBER_HOME/nodes/<id>/disk/<name>/`.

Within a byte budget, least recently used first out. Last-use times live in the
catalogue (locations, tier "disk"), so they survive restarts and are shared by
every process of the node. Each entry has a lock file: readers hold it shared,
a fetch or an eviction holds it exclusively, so an entry being read is never
evicted and two fetches of one name download it once.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ember.env import ember_home
from ember.errors import CheckpointNotFoundError, StorageFullError
from ember.store.catalog import Catalog, check_name
from ember.store.format import INDEX_FILE, read_index
from ember.store.registry import Registry
from ember.store.scratch import remove_orphans, trash_for
from ember.store.transfer import Progress, file_lock, partial_dir

if TYPE_CHECKING:
    from ember.store.registry_stream import RegistryStream
    from ember.store.write_behind import WriteBehind

TIER = "disk"


class DiskCache:
    """Checkpoints fetched from a registry, under `root`, within `budget_bytes`.

    `catalog` defaults to the one in EMBER_HOME and `node` to the name of root's
    parent (root is normally `$EMBER_HOME/nodes/<node>/disk`). `clock` gives the
    last-use times (seconds)."""

    def __init__(
        self,
        root: Path,
        budget_bytes: int,
        *,
        catalog: Catalog | None = None,
        node: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks = self.root / ".locks"
        self._locks.mkdir(exist_ok=True)
        remove_orphans(self.root)  # evictions a killed process left half done
        self.budget_bytes = budget_bytes
        self.catalog = catalog if catalog is not None else Catalog(ember_home() / "catalog.db")
        self.node = node if node is not None else self.root.parent.name
        self.clock = clock

    def path(self, name: str) -> Path | None:
        """The entry's directory if the cache holds it (does not count as a use)."""
        path = self.root / check_name(name)
        return path if (path / INDEX_FILE).is_file() else None

    def names(self) -> list[str]:
        """Checkpoints in the cache, sorted (partial fetches are hidden, never listed)."""
        return sorted(
            p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / INDEX_FILE).is_file()
        )

    def sizes(self) -> dict[str, int]:
        """Name -> bytes (partitions and files) of every entry."""
        out = {}
        for name in self.names():
            try:
                out[name] = read_index(self.root / name).stored_bytes
            except CheckpointNotFoundError:  # evicted meanwhile
                continue
        return out

    def used_bytes(self) -> int:
        return sum(self.sizes().values())

    @contextmanager
    def reading(self, name: str) -> Iterator[Path | None]:
        """Hold the entry while reading it (it cannot be evicted meanwhile) and mark it
        used. Yields its directory, or None if the cache does not hold it."""
        with file_lock(self._lock_path(name), exclusive=False):
            path = self.path(name)
            if path is not None:
                self.catalog.touch_location(name, self.node, TIER, last_used=self.clock())
            yield path

    def fetch(self, name: str, registry: Registry, *, progress: Progress | None = None) -> Path:
        """The entry's directory, fetched from `registry` first if the cache lacks it.
        Evicts least recently used entries (none being read) to make room before the
        download. StorageFullError if the checkpoint is bigger than the whole budget."""
        with file_lock(self._lock_path(name)):
            path = self.path(name)
            if path is not None:
                self.catalog.touch_location(name, self.node, TIER, last_used=self.clock())
                return path
            size = registry.size(name)
            if size > self.budget_bytes:
                raise StorageFullError(
                    f"checkpoint {name!r} ({size} bytes) is larger than the disk cache budget "
                    f"of node {self.node!r} ({self.budget_bytes} bytes)"
                )
            self.make_room(size)
            path = registry.fetch(name, self.root / name, progress=progress)
            self.catalog.set_location(name, self.node, TIER, size, last_used=self.clock())
            return path

    def partial(self, name: str) -> Path:
        """Where an unfinished copy of `name` lies (it may not exist)."""
        return partial_dir(self.root / check_name(name))

    def write_behind(self, name: str, stream: RegistryStream) -> WriteBehind:
        """The entry's copy, written from `stream`'s buffer as its chunks arrive (call
        its `start(loading)`): under the entry's lock, after making room, published
        once every chunk is in. StorageFullError now if it can never fit."""
        from ember.store.write_behind import WriteBehind

        size = stream.index.stored_bytes
        if size > self.budget_bytes:
            raise StorageFullError(
                f"checkpoint {name!r} ({size} bytes) is larger than the disk cache budget "
                f"of node {self.node!r} ({self.budget_bytes} bytes)"
            )

        @contextmanager
        def locked() -> Iterator[object]:
            with file_lock(self._lock_path(name)):
                if self.path(name) is None:
                    self.make_room(size)
                yield None

        def published() -> None:
            self.catalog.set_location(name, self.node, TIER, size, last_used=self.clock())

        return WriteBehind(
            self.root / check_name(name),
            stream.index_text,
            stream.index,
            stream.files,
            stream.buf,
            locks=locked,
            published=published,
        )

    def make_room(self, nbytes: int) -> list[str]:
        """Evict least recently used entries until `nbytes` more fit in the budget.
        Entries being read are skipped, so the cache may stay over budget until they
        are done. Returns the names evicted."""
        sizes = self.sizes()
        used = sum(sizes.values())
        last_used = {loc.name: loc.last_used for loc in self.catalog.locations(node=self.node, tier=TIER)}
        evicted = []
        for name in sorted(sizes, key=lambda n: last_used.get(n, 0.0)):
            if used + nbytes <= self.budget_bytes:
                break
            if self.evict(name):
                used -= sizes[name]
                evicted.append(name)
        return evicted

    def evict(self, name: str, *, corrupt: bool = False) -> bool:
        """Remove an entry unless it is being read or fetched; True if removed.
        `corrupt`: it failed its checksums, so it goes even while read (a reader keeps
        the files it opened; one that opens later finds none and refetches): a retry
        must never read it again."""
        with file_lock(self._lock_path(name), blocking=False) as locked:
            path = self.path(name)
            if not (locked or corrupt) or path is None:
                return False
            trash = trash_for(path)
            path.rename(trash)
            self.catalog.drop_location(name, self.node, TIER)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _lock_path(self, name: str) -> Path:
        return self._locks / f"{check_name(name)}.lock"
