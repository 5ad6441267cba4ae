"""NodeStore: one node's tiers, nearest first: DRAM pool -> local store / disk cache ->
remote registry. `acquire` finds a checkpoint in the nearest tier that holds it,
brings it into DRAM (verifying every chunk on the way), and leases its tensors.

The catalogue records which node holds what in DRAM and on disk, for placement.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ember.env import registry_location
from ember.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageFullError
from ember.store.catalog import check_name
from ember.store.checksum import digest
from ember.store.disk_cache import DiskCache
from ember.store.dram_pool import DramPool, PoolLease
from ember.store.format import INDEX_FILE, CheckpointIndex, read_index
from ember.store.loader import LoadProgress, load_tensors, stream_tensors
from ember.store.local import LocalStore
from ember.store.registry import Registry, open_registry
from ember.store.scratch import temporary_dir
from ember.store.transfer import Progress
from ember.store.write_behind import WriteBehind

DEFAULT_DRAM_BUDGET = 16 << 30
DEFAULT_DISK_BUDGET = 200 << 30
Tier = Literal["dram", "disk", "store", "registry"]


@dataclass(frozen=True)
class LoadReport:
    """How one acquire was served: from which tier, how many bytes, how long (s).
    For a streaming acquire `seconds` is the time to the lease; `loading` (None once
    the bytes are in) times the rest."""

    name: str
    tier: Tier
    nbytes: int
    seconds: float
    loading: LoadProgress | None = None


class NodeStore:
    """The tiers of node `node_id`, under `$EMBER_HOME/nodes/<node_id>/`.

    `registry` defaults to EMBER_REGISTRY when that is set. `clock` times the loads."""

    def __init__(
        self,
        node_id: str,
        *,
        home: Path | None = None,
        dram_budget: int = DEFAULT_DRAM_BUDGET,
        disk_budget: int = DEFAULT_DISK_BUDGET,
        registry: Registry | None = None,
        local: LocalStore | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.node_id = check_name(node_id)
        self.local = local if local is not None else LocalStore(home)
        self.home = Path(home) if home is not None else self.local.home
        self.root = self.home / "nodes" / self.node_id
        self.catalog = self.local.catalog
        if registry is None and (location := registry_location()):
            registry = open_registry(location)
        self.registry = registry
        self.pool = DramPool(dram_budget, on_evict=self._dropped_from_dram)
        for stale in self.catalog.locations(node=self.node_id, tier="dram"):
            # A new pool is empty: DRAM rows left by an earlier process of this node are stale.
            self.catalog.drop_location(stale.name, self.node_id, "dram")
        self.disk = DiskCache(self.root / "disk", disk_budget, catalog=self.catalog, node=self.node_id)
        self.clock = clock
        self._dirs: dict[str, Path] = {}  # name -> the directory its DRAM copy came from
        self._loading: dict[str, threading.Lock] = {}
        self._writes: dict[str, WriteBehind] = {}  # name -> its disk copy being written behind a download
        self._guard = threading.Lock()

    def acquire(
        self, name: str, *, device: str = "cpu", progress: Progress | None = None, stream: bool = False
    ) -> tuple[PoolLease, Path, LoadReport]:
        """Lease checkpoint `name`'s tensors, loading them into DRAM if needed.

        Returns the lease, the checkpoint directory (for model/ files: config,
        tokenizer) and how it was loaded. A DRAM hit does no I/O and no copy. For a
        non-CPU `device` the DRAM copy is copied there once (shared storage stays
        shared) and the returned lease owns that copy, outside the pool.

        `stream` (CPU only): a load returns as soon as it has started, its tensors
        still arriving; `lease.loading` tracks them (see LoadProgress). A registry
        download goes straight into the pool, in need order; the disk cache's copy
        is written behind it (see `settle`)."""
        start = self.clock()
        pinned = torch.device(device).type == "cuda"
        stream = stream and torch.device(device).type == "cpu"
        lease = self.pool.acquire(name)
        tier: Tier = "dram"
        if lease is None:
            with self._name_lock(name):  # one load per name at a time; the rest hit DRAM after it
                lease = self.pool.acquire(name)
                if lease is None:
                    lease, tier = self._load(name, progress, stream, pinned)
        path = self._dirs[name]
        if lease.loading is not None and not stream:
            try:  # a streaming load by another caller: wait for its end before any use or copy
                lease.loading.wait()
            except BaseException:
                lease.release()
                raise
            lease.loading = None
        if torch.device(device).type != "cpu":
            lease = _copy_to_device(lease, torch.device(device))
        return lease, path, LoadReport(name, tier, lease.nbytes, self.clock() - start, lease.loading)

    def holds(self, name: str) -> set[str]:
        """The tiers on this node that hold `name`: "dram", "disk", "store"."""
        tiers = set()
        if name in self.pool:
            tiers.add("dram")
        if self.disk.path(name) is not None:
            tiers.add("disk")
        rec = self.local.catalog.find(name)
        if rec is not None and Path(rec.path).is_dir():
            tiers.add("store")
        return tiers

    def nearest_dir(self, name: str) -> Path | None:
        """The checkpoint directory the next acquire of `name` will return, if a tier on
        this node holds it already (None when it must come from the registry). Costs a
        catalogue read and a stat, no load."""
        with self._guard:
            if name in self.pool and name in self._dirs:
                return self._dirs[name]
        rec = self.local.catalog.find(name)
        if rec is not None and Path(rec.path).is_dir():
            return Path(rec.path)
        return self.disk.path(name)

    def evict(self, name: str) -> bool:
        """Drop `name` from this node's DRAM pool (False if absent or leased)."""
        return self.pool.evict(name)

    def _load(
        self, name: str, progress: Progress | None, stream: bool, pinned: bool
    ) -> tuple[PoolLease, Tier]:
        rec = self.local.catalog.find(name)
        if rec is not None and Path(rec.path).is_dir():
            nothing_to_hold = contextlib.ExitStack()
            return self._into_dram(name, Path(rec.path), stream, nothing_to_hold, cached=False), "store"
        hold = contextlib.ExitStack()  # the disk entry stays ours until its bytes are in
        path = hold.enter_context(self.disk.reading(name))
        if path is not None:
            try:
                return self._into_dram(name, path, stream, hold, cached=True), "disk"
            except BaseException:
                hold.close()
                raise
        hold.close()
        if self.registry is None:
            raise CheckpointNotFoundError(
                f"checkpoint {name!r} is not in the store or node {self.node_id!r}'s disk cache "
                "(see `ember store ls`), and no registry is configured (--registry / EMBER_REGISTRY)"
            )
        return self._from_registry(name, progress, pinned), "registry"

    def _from_registry(self, name: str, progress: Progress | None, pinned: bool) -> PoolLease:
        """Download `name` straight into the pool, in need order, serving as it arrives;
        the disk cache's copy is written from the same buffer behind it."""
        assert self.registry is not None
        download = self.registry.open_stream(name, pinned=pinned)
        try:
            writer: WriteBehind | None = self.disk.write_behind(name, download)
        except StorageFullError:  # it will never fit on disk: serve it from DRAM alone
            writer = None
        self._dirs[name] = self._model_files(name, download.index_text, download.files)
        lease = self.pool.insert(name, download.tensors, download.nbytes, loading=download.progress)
        loading = download.progress
        loading.add_done_callback(lambda done: self._arrived(name, done, download.nbytes, cached=False))
        if writer is None:
            download.start(progress=progress)
            return lease
        with self._guard:
            self._writes[name] = writer
        writer.start(loading)
        # what an earlier download of it left on disk is read, not fetched again
        download.start(on_chunk=writer.chunk, progress=progress, partial=self.disk.partial(name))
        return lease

    def _model_files(self, name: str, index_text: str, files: dict[str, bytes]) -> Path:
        """A directory named `name` with the index and stored files (config, tokenizer)
        of a checkpoint still downloading: what the engine reads while the disk copy is
        unwritten. Kept per index version, written once."""
        final = self.root / "meta" / digest(index_text.encode()) / name
        if (final / INDEX_FILE).is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with temporary_dir(final) as tmp:
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            (tmp / INDEX_FILE).write_text(index_text)
            with contextlib.suppress(OSError):  # another process wrote it first: the same bytes
                tmp.rename(final)
        return final

    def settle(self, name: str, timeout: float | None = None) -> BaseException | None:
        """Wait for the disk copy being written behind a download of `name` (if any);
        returns why it was not published, None if it was or there was none."""
        with self._guard:
            writer = self._writes.get(name)
        if writer is None:
            return None
        if not writer.done.wait(timeout):
            raise TimeoutError(f"the disk copy of {name!r} is still being written")
        with self._guard:
            if self._writes.get(name) is writer:
                del self._writes[name]
        return writer.error

    def _into_dram(
        self, name: str, path: Path, stream: bool, hold: contextlib.ExitStack, *, cached: bool
    ) -> PoolLease:
        """Read `path` into the pool; `hold` (the disk entry's read lock) is closed once
        the bytes are in. Store -> node is a copy between tiers: every chunk's checksum
        is checked, and a `cached` (disk cache) copy that fails is evicted, so the next
        load fetches a good one."""
        index = read_index(path)  # parsed once: the loader takes it
        nbytes = index.total_bytes
        if not stream:
            try:
                with hold:
                    tensors = load_tensors(path, verify=True, index=index)
            except CorruptCheckpointError:
                if cached:
                    self.disk.evict(name, corrupt=True)
                raise
            self._dirs[name] = path  # before the insert: a hit in another thread reads it
            lease = self.pool.insert(name, tensors, nbytes)
            self.catalog.set_location(name, self.node_id, "dram", nbytes)
            return lease
        tensors, loading = stream_tensors(path, verify=True, index=index, clock=self.clock)
        # a cached copy that fails its checksums is evicted, maybe before the engine has
        # read its config: hand out a copy of the small files that outlives it
        self._dirs[name] = (
            self._model_files(name, (path / INDEX_FILE).read_text(), _stored_files(path, index))
            if cached
            else path
        )
        lease = self.pool.insert(name, tensors, nbytes, loading=loading)

        loading.add_done_callback(lambda done: self._arrived(name, done, nbytes, cached=cached, hold=hold))
        return lease

    def _arrived(
        self,
        name: str,
        done: LoadProgress,
        nbytes: int,
        *,
        cached: bool,
        hold: contextlib.ExitStack | None = None,
    ) -> None:
        """A streaming load ended: record it in DRAM, or drop the failed copy from the
        pool (and a corrupt one from the disk cache)."""
        if hold is not None:
            hold.close()
        if done.error is None:
            self.catalog.set_location(name, self.node_id, "dram", nbytes)
            return
        self.pool.discard(name, done)  # nobody may lease a half-read or corrupt copy again
        if cached and isinstance(done.error, CorruptCheckpointError):
            self.disk.evict(name, corrupt=True)

    def _dropped_from_dram(self, name: str) -> None:
        self.catalog.drop_location(name, self.node_id, "dram")

    def _name_lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._loading.setdefault(name, threading.Lock())


def _stored_files(path: Path, index: CheckpointIndex) -> dict[str, bytes]:
    """A checkpoint's stored files (config, tokenizer) by relative path."""
    return {rel: (path / rel).read_bytes() for rel in index.files}


def _copy_to_device(lease: PoolLease, device: torch.device) -> PoolLease:
    """Copy a host lease's tensors to `device`, one copy per underlying storage, so
    tied tensors stay tied; releases the host lease (its entry stays cached)."""
    storages: dict[int, torch.UntypedStorage] = {}
    out = {}
    with lease:
        for key, t in lease.tensors.items():
            host = t.untyped_storage()
            dev = storages.get(host.data_ptr())
            if dev is None:
                dev = torch.UntypedStorage(host.nbytes(), device=device)
                dev.copy_(host)
                storages[host.data_ptr()] = dev
            view = torch.empty(0, dtype=t.dtype, device=device)
            out[key] = view.set_(dev, t.storage_offset(), t.shape, t.stride())
    return PoolLease(lease.key, out, lease.nbytes, None)
