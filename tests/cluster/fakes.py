"""A fake clock and node statuses for the control plane's plain objects, a node
wrapper that fails on demand, and SQLite commits that fail on demand."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from ember.cluster.messages import BandwidthProbe, InstanceInfo, LoadTier, NodeStatus
from ember.cluster.runtime import NodeRuntime
from ember.db import SqliteDb
from ember.engine.request import EngineRequest, EngineStats, RequestOutput, RequestSnapshot
from ember.errors import NodeFailedError

GB = 1_000_000_000


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def status(
    node: str, *, free: int = 1, slots: int = 1, dram: tuple[str, ...] = (), disk: tuple[str, ...] = ()
) -> NodeStatus:
    return NodeStatus(node, slots, free, {name: GB for name in dram}, disk)


def loaded(node: str, tier: LoadTier, nbytes: int, seconds: float, overhead_s: float = 0.0) -> InstanceInfo:
    return InstanceInfo("i", "dep", "m", node, tier, nbytes, seconds, seconds + overhead_s, 256)


class FlakyNode:
    """A NodeRuntime in front of a real one that can die, as a Ray actor does: once
    dead, every call and every open stream raises NodeFailedError. `die_after_tokens`:
    it dies once its streams delivered that many tokens. `broken`: the calls named
    there raise NodeFailedError while the rest work. `hang_status`: status() never
    answers (the health check's timeout). `start_errors`: what the next start_instance
    calls raise, one each, before they work again; `starts` counts the calls.
    `started(instance_id)` runs as each start returns. `loaded_gate`: instance_loaded
    waits for it, then raises the next of `loaded_errors` if any (a streamed load that
    fails once the instance already serves)."""

    def __init__(self, inner: NodeRuntime, *, die_after_tokens: int | None = None) -> None:
        self.inner = inner
        self.node_id = inner.node_id
        self.dead = False
        self.die_after_tokens = die_after_tokens
        self.broken: set[str] = set()
        self.hang_status = False
        self.streamed = 0
        self.start_errors: list[BaseException] = []
        self.starts = 0
        self.started: Callable[[str], None] = lambda instance_id: None
        self.loaded_gate: asyncio.Event | None = None
        self.loaded_errors: list[BaseException] = []

    def _check(self, call: str) -> None:
        if self.dead or call in self.broken:
            raise NodeFailedError(f"node {self.node_id} died", node=self.node_id)

    async def start_instance(
        self, instance_id: str, deployment: str, model: str, *, cold: bool = False
    ) -> InstanceInfo:
        self._check("start_instance")
        self.starts += 1
        if self.start_errors:
            raise self.start_errors.pop(0)
        info = await self.inner.start_instance(instance_id, deployment, model, cold=cold)
        self.started(instance_id)
        return info

    async def instance_loaded(self, instance_id: str) -> InstanceInfo:
        self._check("instance_loaded")
        if self.loaded_gate is not None:
            await self.loaded_gate.wait()
        if self.loaded_errors:
            raise self.loaded_errors.pop(0)
        return await self.inner.instance_loaded(instance_id)

    async def stop_instance(self, instance_id: str) -> None:
        self._check("stop_instance")
        await self.inner.stop_instance(instance_id)

    async def generate(self, instance_id: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self._check("generate")
        async with contextlib.aclosing(self.inner.generate(instance_id, request)) as stream:  # type: ignore[type-var]
            async for delta in stream:
                self._check("generate")
                yield delta
                self.streamed += len(delta.outputs[0].token_ids)
                if self.die_after_tokens is not None and self.streamed >= self.die_after_tokens:
                    self.dead = True

    async def abort(self, instance_id: str, request_id: str) -> RequestSnapshot | None:
        self._check("abort")
        return await self.inner.abort(instance_id, request_id)

    async def prewarm(self, instance_id: str, request: EngineRequest) -> int:
        self._check("prewarm")
        return await self.inner.prewarm(instance_id, request)

    async def engine_stats(self, instance_id: str) -> EngineStats:
        self._check("engine_stats")
        return await self.inner.engine_stats(instance_id)

    async def status(self) -> NodeStatus:
        self._check("status")
        if self.hang_status:
            await asyncio.Event().wait()
        return await self.inner.status()

    async def probe_bandwidth(self) -> BandwidthProbe:
        return await self.inner.probe_bandwidth()

    async def checkpoint_size(self, model: str) -> int:
        self._check("checkpoint_size")
        return await self.inner.checkpoint_size(model)

    async def model_files(self, model: str) -> dict[str, bytes]:
        self._check("model_files")
        return await self.inner.model_files(model)

    async def close(self) -> None:
        await self.inner.close()  # the test's engines stop even on a "dead" node


class FailingCommits:
    """The next `arm(n)` commits to the SQLite file at `path` fail as a failing disk
    does (sqlite3.OperationalError at COMMIT, so the transaction rolls back); commits
    to other files (the store's catalogue) go through. `failed` counts the failures."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path, message: str = "disk I/O error") -> None:
        self.armed = 0
        self.failed = 0
        commit = SqliteDb._commit

        def failing_commit(db: SqliteDb, conn: sqlite3.Connection) -> None:
            if db.path == path and self.armed > 0:
                self.armed -= 1
                self.failed += 1
                raise sqlite3.OperationalError(message)
            commit(db, conn)

        monkeypatch.setattr(SqliteDb, "_commit", failing_commit)

    def arm(self, commits: int = 1) -> None:
        self.armed = commits
