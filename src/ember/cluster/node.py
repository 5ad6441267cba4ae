"""EmbeddedNode: a node of the cluster inside this process.

It has instance slots, its own NodeStore under `$EMBER_HOME/nodes/<id>/` (a DRAM
pool and a disk cache of registry copies; its own store is empty, so a checkpoint
it lacks is fetched from the registry), a loading queue (one load at a time), and
one AsyncEngine per instance over weights leased from the DRAM pool: a DRAM hit
costs no I/O and no copy. An instance whose engine thread died answers every call and
stream with InstanceFailedError, which the controller treats as that instance's
failure: it stops it and resumes its requests elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.cluster.messages import BandwidthProbe, InstanceInfo, LoadTier, NodeStatus
from ember.engine.async_engine import AsyncEngine
from ember.engine.config import EngineConfig
from ember.engine.request import EngineRequest, EngineStats, RequestOutput, RequestSnapshot
from ember.env import ember_home
from ember.errors import (
    CheckpointNotFoundError,
    CorruptCacheCopyError,
    CorruptCheckpointError,
    EmberError,
    EngineDeadError,
    InstanceFailedError,
    ModelNotFoundError,
    OverloadedError,
)
from ember.store.dram_pool import PoolLease
from ember.store.format import read_index
from ember.store.local import LocalStore
from ember.store.node import DEFAULT_DISK_BUDGET, DEFAULT_DRAM_BUDGET, NodeStore
from ember.store.registry import DirectoryRegistry, Registry

PROBE_BYTES = 16 << 20


@dataclass
class _Instance:
    info: InstanceInfo
    engine: AsyncEngine
    lease: PoolLease
    began: float  # perf_counter when its load began
    cached: bool  # its weights come from the node's disk cache (dropped if they are corrupt)
    loaded: asyncio.Future[InstanceInfo] | None = None


class EmbeddedNode:
    """A NodeRuntime running its instances in this process."""

    def __init__(
        self,
        node_id: str,
        registry: Registry,
        *,
        slots: int = 1,
        home: Path | None = None,
        engine_options: dict[str, Any] | None = None,
        dram_budget: int = DEFAULT_DRAM_BUDGET,
        disk_budget: int = DEFAULT_DISK_BUDGET,
        probe_bytes: int = PROBE_BYTES,
    ) -> None:
        if slots < 1:
            raise ValueError("a node needs at least one slot")
        self.node_id = node_id
        self.slots = slots
        home = Path(home) if home is not None else ember_home()
        self.registry = registry
        self.store = NodeStore(
            node_id,
            home=home,
            local=LocalStore(home / "nodes" / node_id),
            registry=registry,
            dram_budget=dram_budget,
            disk_budget=disk_budget,
        )
        self.config = EngineConfig(**(engine_options or {}))
        self.probe_bytes = probe_bytes
        self._instances: dict[str, _Instance] = {}
        self._taken = 0  # slots of instances loading or running
        self._loading = asyncio.Lock()

    # -- instances --------------------------------------------------------------------

    async def start_instance(
        self, instance_id: str, deployment: str, model: str, *, cold: bool = False
    ) -> InstanceInfo:
        if self._taken >= self.slots:
            raise OverloadedError(f"node {self.node_id} has no free slot", retry_after_s=5.0)
        self._taken += 1
        try:
            await self._loading.acquire()
        except BaseException:
            self._taken -= 1
            raise
        try:
            inst = await asyncio.to_thread(self._load, instance_id, deployment, model, cold)
        except BaseException:
            self._loading.release()
            self._taken -= 1
            raise
        self._instances[instance_id] = inst
        inst.loaded = asyncio.ensure_future(self._arrived(inst))
        inst.loaded.add_done_callback(_retrieve)
        return inst.info

    def _load(self, instance_id: str, deployment: str, model: str, cold: bool) -> _Instance:
        from ember.engine.loader import load_engine

        start = time.perf_counter()
        if cold:
            self.store.evict(model)
            self.store.disk.evict(model)
        _prefetch_tokenizer(self.store.nearest_dir(model))
        lease, path, report = self.store.acquire(model, device=str(self.config.torch_device), stream=True)
        cached = report.tier in ("disk", "registry")
        try:
            engine = load_engine(path, self.config, weights=lease.tensors, loading=lease.loading)
        except BaseException as exc:
            lease.release()
            streamed = lease.loading.error if lease.loading is not None else None
            if isinstance(streamed, CorruptCheckpointError):  # its stream failed and dropped the copy
                raise (self._dropped(streamed) if cached else streamed) from exc
            if isinstance(exc, CheckpointNotFoundError):  # the copy it leased went away meanwhile
                gone = f"node {self.node_id}: the copy of {model!r} went away ({exc})"
                raise OverloadedError(gone) from exc
            raise
        tier: LoadTier = "disk" if report.tier == "store" else report.tier
        info = InstanceInfo(
            instance_id, deployment, model, self.node_id, tier, report.nbytes, report.seconds,
            time.perf_counter() - start, engine.max_model_len, loading=lease.loading is not None,
        )  # fmt: skip
        return _Instance(info, AsyncEngine(engine), lease, start, cached=cached)

    async def _arrived(self, inst: _Instance) -> InstanceInfo:
        """Once the instance's weights are all in: its final info; frees the loading queue."""
        try:
            loading = inst.lease.loading
            if loading is not None:
                try:
                    await asyncio.to_thread(loading.wait)
                except CorruptCheckpointError as exc:
                    if not inst.cached:
                        raise
                    raise self._dropped(exc) from exc
                assert loading.finished is not None
                load_s = loading.finished - inst.began
                inst.info = dataclasses.replace(
                    inst.info, load_s=load_s, startup_s=max(inst.info.startup_s, load_s), loading=False
                )
            return inst.info
        finally:
            self._loading.release()

    def _dropped(self, exc: CorruptCheckpointError) -> CorruptCacheCopyError:
        """A cached copy's streamed load failed its checksums: the copy is dropped, so a retry refetches."""
        return CorruptCacheCopyError(
            f"{exc} (node {self.node_id} dropped its copy: the next start fetches a fresh one)"
        )

    async def instance_loaded(self, instance_id: str) -> InstanceInfo:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise ModelNotFoundError(f"no instance {instance_id!r} on node {self.node_id}")
        assert inst.loaded is not None
        return await asyncio.shield(inst.loaded)

    async def stop_instance(self, instance_id: str) -> None:
        inst = self._instances.pop(instance_id, None)
        if inst is None:
            return
        try:
            await asyncio.to_thread(inst.engine.shutdown)
        finally:
            inst.lease.release()
            self._taken -= 1

    async def generate(self, instance_id: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        engine = self._engine(instance_id)
        try:
            async for delta in engine.generate(request):
                yield delta
        except EngineDeadError as e:
            raise self._failed(instance_id, e) from e

    async def abort(self, instance_id: str, request_id: str) -> RequestSnapshot | None:
        return await self._engine(instance_id).abort(request_id)

    async def prewarm(self, instance_id: str, request: EngineRequest) -> int:
        try:
            return await self._engine(instance_id).prewarm(request)
        except EngineDeadError as e:
            raise self._failed(instance_id, e) from e

    def _engine(self, instance_id: str) -> AsyncEngine:
        """The instance's engine; InstanceFailedError if its thread died."""
        engine = self.engine(instance_id)
        if (dead := engine.failure) is not None:
            raise self._failed(instance_id, dead)
        return engine

    def _failed(self, instance_id: str, error: EngineDeadError) -> InstanceFailedError:
        message = f"instance {instance_id} on node {self.node_id} failed: {error}"
        return InstanceFailedError(message, node=self.node_id, instance=instance_id)

    async def engine_stats(self, instance_id: str) -> EngineStats:
        return self._engine(instance_id).engine.stats()

    def engine(self, instance_id: str) -> AsyncEngine:
        """The instance's engine, alive or not (tests pace or inspect it)."""
        inst = self._instances.get(instance_id)
        if inst is None:
            raise ModelNotFoundError(f"no instance {instance_id!r} on node {self.node_id}")
        return inst.engine

    # -- what the node holds ----------------------------------------------------------

    async def status(self) -> NodeStatus:
        return NodeStatus(
            self.node_id,
            self.slots,
            self.slots - self._taken,
            self.store.pool.keys(),
            tuple(self.store.disk.names()),
            tuple(self._instances),
        )

    async def checkpoint_size(self, model: str) -> int:
        return await asyncio.to_thread(self._checkpoint_size, model)

    def _checkpoint_size(self, model: str) -> int:
        held = self.store.pool.keys().get(model)
        if held is not None:
            return held
        path = self.store.disk.path(model)
        if path is not None:
            return read_index(path).total_bytes
        return self.registry.size(model)

    async def model_files(self, model: str) -> dict[str, bytes]:
        return await asyncio.to_thread(self._model_files, model)

    def _model_files(self, model: str) -> dict[str, bytes]:
        path = self.store.disk.path(model)
        if path is None:  # only these files from the registry: fetching the weights is a load's job
            files = self.registry.read_files(model, prefix="model/")
            return {rel.removeprefix("model/"): data for rel, data in sorted(files.items())}
        model_dir = path / "model"
        return {
            str(f.relative_to(model_dir)): f.read_bytes() for f in sorted(model_dir.rglob("*")) if f.is_file()
        }

    async def probe_bandwidth(self) -> BandwidthProbe:
        return await asyncio.to_thread(self._probe)

    def _probe(self) -> BandwidthProbe:
        n = self.probe_bytes
        src = torch.ones(n, dtype=torch.uint8)
        dst = torch.zeros_like(src)  # touched first: a pool hit pays no page faults either
        start = time.perf_counter()
        dst.copy_(src)
        measured = {"dram": n / max(time.perf_counter() - start, 1e-9)}
        probe = self.store.root / ".probe"
        try:
            with open(probe, "wb") as f:
                f.write(bytes(n))
                f.flush()
                os.fsync(f.fileno())
            measured["disk"] = n / _timed_read(probe, n)
        finally:
            probe.unlink(missing_ok=True)
        if isinstance(self.registry, DirectoryRegistry):
            sample = _largest_file(self.registry.root)
            if sample is not None:
                measured["registry"] = min(n, sample.stat().st_size) / _timed_read(sample, n)
        return BandwidthProbe(self.node_id, measured)

    async def close(self) -> None:
        for instance_id in list(self._instances):
            with contextlib.suppress(EmberError):
                await self.stop_instance(instance_id)


def _retrieve(future: asyncio.Future[InstanceInfo]) -> None:
    """Mark a load's failure as seen: instance_loaded re-raises it to whoever asks."""
    if not future.cancelled():
        future.exception()


def _prefetch_tokenizer(checkpoint: Path | None) -> None:
    """Parse the checkpoint's tokenizer on another thread while its weights load:
    load_engine then finds it in the tokenizer cache (or waits for this parse), so a
    start whose tokenizer is not cached yet pays max(weights, tokenizer), not the sum.
    Errors are left to load_engine's own call, which raises them."""
    if checkpoint is None:
        return
    # transformers resolves its names lazily and not thread-safely: two threads' first
    # imports can race ("cannot import name 'PreTrainedTokenizerFast'"), so the first
    # one happens here, before the parse thread and the weights' load both need it.
    from transformers import PreTrainedTokenizerFast  # noqa: F401

    def parse() -> None:
        from ember.engine.loader import MODEL_DIR, load_tokenizer

        with contextlib.suppress(Exception):
            load_tokenizer(checkpoint / MODEL_DIR)

    threading.Thread(target=parse, name="ember-tokenizer", daemon=True).start()


def _timed_read(path: Path, limit: int) -> float:
    """Seconds to read up to `limit` bytes of `path` with its cached pages dropped first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        done = 0
        while done < limit and (chunk := os.read(fd, min(4 << 20, limit - done))):
            done += len(chunk)
        return max(time.perf_counter() - start, 1e-9)
    finally:
        os.close(fd)


def _largest_file(root: Path) -> Path | None:
    """A partition file of some checkpoint in a directory registry (to time reads)."""
    if not root.is_dir():
        return None
    for ckpt in sorted(root.iterdir()):
        if ckpt.name.startswith(".") or not ckpt.is_dir():
            continue
        files = [f for f in ckpt.iterdir() if f.is_file() and f.suffix != ".json"]
        if files:
            return max(files, key=lambda f: f.stat().st_size)
    return None
