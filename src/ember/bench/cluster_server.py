"""The server `ember bench cluster` measures: the same HTTP app, Controller and
EmbeddedNodes as `ember serve --nodes N --slots S --dram-bytes D --disk-bytes K
--placement P [--no-migration]`, in this process (bench/cold_server.py's BenchServer),
with its own home per policy (empty DRAM pools and disk caches) and a registry over
loopback HTTP.

What the bench reads back is recorded beside the control plane, not inside it: each
node records the tier of every instance it starts (the InstanceInfo it returns), the
placement policy is wrapped to count the starts that found no free slot first, and the
cluster's events are passed on to the server's metrics and counted (migrations).

Honest tiers: a disk start should read the disk, not the page cache, and a registry
start should read the registry's disk. A keeper thread drops, every `period_s`, the
page cache of the registry's files and of every disk-cache copy that is not also in
its node's DRAM pool (one that is would be served from DRAM anyway).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ember.bench.cold_server import TICK_S, BenchServer, files_under
from ember.bench.page_cache import evict_page_cache
from ember.cluster.controller import Controller, ControllerConfig
from ember.cluster.estimator import Observation, StartupTimeEstimator
from ember.cluster.events import ClusterEvents, Direction
from ember.cluster.messages import TIERS, InstanceInfo
from ember.cluster.migration_cost import MigrationCost
from ember.cluster.node import EmbeddedNode
from ember.cluster.placement import NodeView, Placement, PlacementPolicy, make_policy
from ember.cluster.state import ClusterState
from ember.server.admin import add_admin_routes
from ember.server.app import create_app
from ember.server.metrics import ClusterMetrics
from ember.store.registry import HttpRegistry, Registry

NO_MIGRATION = "startup-time-aware-no-migration"
BENCH_POLICIES = ("startup-time-aware", "random", "round-robin", "remote-only", NO_MIGRATION)


@dataclass
class StartLog:
    """Every instance start of one policy's run: instance id -> tier, in order."""

    tiers: dict[str, str] = field(default_factory=dict)
    infos: dict[str, InstanceInfo] = field(default_factory=dict)  # final InstanceInfo, once loaded
    waited: set[str] = field(default_factory=set)  # instances whose placement found no free slot at first
    held: set[str] = field(default_factory=set)  # models placed after waiting, their instance not started yet
    migrations: int = 0
    migrated_requests: int = 0
    reclaims: int = 0  # idle instances stopped early because a start needed their slot
    decisions: list[dict[str, Any]] = field(default_factory=list)  # every placement, in order

    def start_records(self) -> list[dict[str, Any]]:
        """Every start, in order: where, from which tier, and its load and start-up s."""
        keys = ("instance_id", "model", "node", "tier", "nbytes", "load_s", "startup_s")
        return [{k: getattr(info, k) for k in keys} for info in self.infos.values()]

    def by_tier(self) -> dict[str, int]:
        counts = Counter(self.tiers.values())
        return {t: counts.get(t, 0) for t in TIERS}

    def load_figures(self) -> dict[str, dict[str, float | int | None]]:
        """Per tier, the loads measured: how many, median bytes/s of their I/O (bytes /
        load_s) and median overhead s (engine build: startup_s - load_s)."""
        out: dict[str, dict[str, float | int | None]] = {}
        for tier in TIERS:
            infos = [i for i in self.infos.values() if i.tier == tier and not i.loading]
            rates = [i.nbytes / i.load_s for i in infos if i.load_s > 0]
            overheads = [max(0.0, i.startup_s - i.load_s) for i in infos]
            out[tier] = {
                "loads": len(infos),
                "bytes_per_s": statistics.median(rates) if rates else None,
                "overhead_s": statistics.median(overheads) if overheads else None,
            }
        return out


class RecordingNode(EmbeddedNode):
    """An EmbeddedNode that records the tier of every instance it starts."""

    def __init__(self, *args: Any, log: StartLog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = log

    async def start_instance(
        self, instance_id: str, deployment: str, model: str, *, cold: bool = False
    ) -> InstanceInfo:
        if model in self.log.held:
            self.log.held.discard(model)
            self.log.waited.add(instance_id)
        info = await super().start_instance(instance_id, deployment, model, cold=cold)
        self.log.tiers[instance_id] = info.tier
        self.log.infos[instance_id] = info
        return info

    async def instance_loaded(self, instance_id: str) -> InstanceInfo:
        info = await super().instance_loaded(instance_id)
        self.log.infos[instance_id] = info
        return info


class CountingPolicy:
    """A placement policy that counts the starts it could not place at once: a model
    whose placement said wait, migrate or nothing, and then start."""

    def __init__(self, inner: PlacementPolicy, log: StartLog) -> None:
        self.inner, self.log, self.name = inner, log, inner.name
        self._held: set[str] = set()

    def place(
        self, checkpoint: str, nbytes: int, nodes: Sequence[NodeView], slots: int = 1
    ) -> Placement | None:
        placement = self.inner.place(checkpoint, nbytes, nodes, slots)
        self.log.decisions.append(_decision(checkpoint, placement))
        if placement is None or placement.action != "start":
            self._held.add(checkpoint)
        elif checkpoint in self._held:
            self._held.discard(checkpoint)
            self.log.held.add(checkpoint)
        return placement


def _decision(checkpoint: str, p: Placement | None) -> dict[str, Any]:
    if p is None:
        return {"at": time.monotonic(), "model": checkpoint, "action": None}
    return {
        "at": time.monotonic(), "model": checkpoint, "action": p.action, "node": p.node, "tier": p.tier,
        "estimate_s": p.estimate_s, "wait_s": p.wait_s, "reclaim": len(p.reclaim), "migrate_to": p.migrate_to,
    }  # fmt: skip


class CountingEvents:
    """The cluster's events, passed on to the server's metrics and counted."""

    def __init__(self, inner: ClusterEvents, log: StartLog) -> None:
        self.inner, self.log = inner, log

    def instance_started(self, deployment: str, info: InstanceInfo, observed: Observation) -> None:
        self.inner.instance_started(deployment, info, observed)

    def scaled(self, deployment: str, direction: Direction) -> None:
        self.inner.scaled(deployment, direction)

    def migrated(self, deployment: str, moved: int, stayed: int) -> None:
        self.log.migrations += 1
        self.log.migrated_requests += moved
        self.inner.migrated(deployment, moved, stayed)

    def failed_over(self, deployment: str) -> None:
        self.inner.failed_over(deployment)

    def reclaimed(self, deployment: str) -> None:
        self.log.reclaims += 1
        self.inner.reclaimed(deployment)


@dataclass(frozen=True)
class ClusterShape:
    nodes: int = 4
    slots: int = 1
    dram_bytes: int = 1 << 30
    disk_bytes: int = 2 << 30
    keep_alive_s: float = 10.0
    start_timeout_s: float = 300.0
    engine_options: dict[str, Any] = field(default_factory=dict)


class ClusterServer(BenchServer):
    """An Ember server over `shape.nodes` embedded nodes placing by `policy` (one of
    BENCH_POLICIES), with its state and node tiers under `home`, fetching from the
    registry at `registry_url` (directory `registry_root`). A context manager."""

    def __init__(
        self, home: Path, registry_url: str, registry_root: Path, policy: str, shape: ClusterShape
    ) -> None:
        self.home, self.registry_root, self.shape = home, registry_root, shape
        self.log = StartLog()
        registry = HttpRegistry(registry_url)
        self.nodes = [self._node(f"node{i}", registry) for i in range(shape.nodes)]
        self.estimator = StartupTimeEstimator()
        migrate = policy != NO_MIGRATION
        cost = MigrationCost()
        base = "startup-time-aware" if policy == NO_MIGRATION else policy
        inner = make_policy(base, self.estimator, migration=cost if migrate else None)
        app = create_app(max_in_flight=4096)
        add_admin_routes(app)
        controller = Controller(
            self.nodes,
            state=ClusterState(home / "cluster.db"),
            policy=CountingPolicy(inner, self.log),
            estimator=self.estimator,
            config=ControllerConfig(start_timeout_s=shape.start_timeout_s, tick_s=TICK_S, migrate=migrate),
            events=CountingEvents(ClusterMetrics(app.state.metrics.registry), self.log),
            model_root=home / "cluster" / "models",
            migration_cost=cost,
        )
        super().__init__(controller, registry, app, keep_alive_s=shape.keep_alive_s)
        self.keeper = ColdTiers(self.nodes, registry_root)

    def _node(self, node_id: str, registry: Registry) -> RecordingNode:
        s = self.shape
        return RecordingNode(
            node_id, registry, slots=s.slots, home=self.home, engine_options=s.engine_options,
            dram_budget=s.dram_bytes, disk_budget=s.disk_bytes, log=self.log,
        )  # fmt: skip

    def __enter__(self) -> ClusterServer:
        super().__enter__()
        self.keeper.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.keeper.stop()
        super().__exit__(exc_type, exc, tb)

    def loads(self) -> int:
        """Instance loads the controller recorded (finished loads)."""
        return len(self.controller.state.loads(limit=1_000_000))


class ColdTiers:
    """The keeper thread: drops the page cache of the registry's files and of the disk
    copies their node's DRAM pool does not hold, every `period_s`."""

    def __init__(self, nodes: Sequence[EmbeddedNode], registry_root: Path, period_s: float = 0.5) -> None:
        self.nodes, self.registry_root, self.period_s = nodes, registry_root, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ember-bench-cold-tiers", daemon=True)

    def start(self) -> None:
        self.drop()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.drop()

    def drop(self) -> None:
        paths = files_under(self.registry_root)
        for node in self.nodes:
            for name in node.store.disk.names():
                copy = node.store.disk.path(name)
                if copy is not None and "dram" not in node.store.holds(name):
                    with contextlib.suppress(OSError):  # evicted while we list it
                        paths.extend(files_under(copy))
        for path in paths:
            with contextlib.suppress(OSError):  # a copy written or dropped meanwhile
                evict_page_cache([path])
