"""The controller on Ray: a named actor on the head node, and the server's side of it.

`ControllerActor` ("ember-controller" in namespace "ember") holds the Controller over
a RayCluster (one agent per Ray node, kept in step with the cluster) and serves the
head's store to the other machines. It starts itself on its first call, so when it
dies Ray restarts it (max_restarts) and the new one adopts the deployments from
`$EMBER_HOME/cluster.db`; its node agents, owned by it, die with it, so the
instances that did are not reported live.

`RayBackend` is the ModelBackend the HTTP server holds: token streams come through
the actor as Ray streaming generators; /v1/models, context lengths and gauges are
served from a copy refreshed every second (ModelInfo needs the tokenizer, which is
read from the model files the actor wrote under the head's EMBER_HOME). Scale
events reach the server's metrics the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.backend import ModelInfo, ModelState
from ember.cluster.controller import Controller, ControllerConfig
from ember.cluster.estimator import Observation
from ember.cluster.events import ClusterEvents, Direction
from ember.cluster.messages import InstanceInfo
from ember.cluster.model_files import model_info
from ember.cluster.ray_cluster import NAMESPACE, RayCluster
from ember.cluster.ray_node import import_ray, ray_deltas
from ember.cluster.state import ClusterState, Deployment
from ember.engine.request import EngineRequest, EngineStats, RequestOutput
from ember.errors import ModelNotFoundError, OverloadedError
from ember.store.node import DEFAULT_DISK_BUDGET, DEFAULT_DRAM_BUDGET

log = logging.getLogger(__name__)

ACTOR_NAME = "ember-controller"
REFRESH_S = 1.0


@dataclass(frozen=True)
class RayControllerConfig:
    """What the controller actor is started with (and restarted with)."""

    home: str  # the head's EMBER_HOME: cluster.db, the deployments' model files
    registry: str  # a directory (served over HTTP from the head) or an http(s) URL
    engine_options: dict[str, Any] = field(default_factory=dict)
    policy: str = "startup-time-aware"
    start_timeout_s: float = 300.0
    max_model_len: int | None = None
    default_slots: int = 1  # slots of a CPU-only node without the ember_slots resource
    agent_home: str | None = None  # None: each machine's own EMBER_HOME
    tick_s: float | None = 1.0
    dram_budget: int = DEFAULT_DRAM_BUDGET  # each node agent's DRAM pool, bytes
    disk_budget: int = DEFAULT_DISK_BUDGET  # each node agent's disk cache, bytes
    migrate: bool = True  # may placement live-migrate (ControllerConfig.migrate)
    deployments: tuple[Deployment, ...] = ()  # added when not stored yet (`ember serve --model`)


@dataclass(frozen=True)
class ModelEntry:
    """What the server needs to build a deployment's ModelInfo on the head."""

    name: str
    model_dir: str
    max_model_len: int
    created: int


class _EventLog:
    """ClusterEvents kept until the server takes them (for its Prometheus metrics)."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, tuple[Any, ...]]] = []

    def instance_started(self, deployment: str, info: InstanceInfo, observed: Observation) -> None:
        self.pending.append(("instance_started", (deployment, info, observed)))

    def scaled(self, deployment: str, direction: Direction) -> None:
        self.pending.append(("scaled", (deployment, direction)))

    def migrated(self, deployment: str, moved: int, stayed: int) -> None:
        self.pending.append(("migrated", (deployment, moved, stayed)))

    def failed_over(self, deployment: str) -> None:
        self.pending.append(("failed_over", (deployment,)))

    def reclaimed(self, deployment: str) -> None:
        self.pending.append(("reclaimed", (deployment,)))


class ControllerActor:
    """The control plane as a Ray actor; every method starts it first if needed."""

    def __init__(self, config: RayControllerConfig) -> None:
        self.config = config
        self._controller: Controller | None = None
        self._cluster: RayCluster | None = None
        self._events = _EventLog()
        self._starting = asyncio.Lock()

    async def _ready(self) -> Controller:
        async with self._starting:
            if self._controller is None:
                self._controller = await self._start()
        return self._controller

    async def _start(self) -> Controller:
        cfg = self.config
        home = Path(cfg.home)
        self._cluster = await asyncio.to_thread(
            RayCluster.connect, "auto", cfg.registry, engine_options=cfg.engine_options,
            default_slots=cfg.default_slots, home=cfg.agent_home,
            budgets=(cfg.dram_budget, cfg.disk_budget),
        )  # fmt: skip
        controller = Controller(
            self._cluster.nodes(),
            state=ClusterState(home / "cluster.db"),
            policy=cfg.policy,
            config=ControllerConfig(
                start_timeout_s=cfg.start_timeout_s,
                tick_s=cfg.tick_s,
                max_model_len=cfg.max_model_len,
                migrate=cfg.migrate,
            ),
            events=self._events,
            model_root=home / "cluster" / "models",
        )
        await controller.start(cfg.deployments)
        self._cluster.watch(controller)
        return controller

    async def wait_ready(self, timeout_s: float) -> None:
        await (await self._ready()).wait_ready(timeout_s)

    async def models(self) -> list[ModelEntry]:
        c = await self._ready()
        model_of = {d.name: d.model for d in c.deployments()}
        return [
            ModelEntry(m.name, str(c.model_root / model_of[m.name]), m.max_model_len, m.created)
            for m in c.models()
            if m.name in model_of
        ]

    async def generate(self, model: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        # Cancelled by RayBackend closing its stream: the controller's stream closes,
        # which closes the node's, which aborts the request there.
        async for delta in (await self._ready()).generate(model, request):
            yield delta

    async def gauges(self) -> dict[str, EngineStats]:
        return await (await self._ready()).collect_gauges()

    async def model_states(self) -> dict[str, ModelState]:
        return (await self._ready()).model_states()

    async def take_events(self) -> list[tuple[str, tuple[Any, ...]]]:
        events, self._events.pending = self._events.pending, []
        return events

    async def deploy(self, dep: Deployment) -> Deployment:
        return await (await self._ready()).deploy(dep)

    async def delete(self, name: str) -> None:
        await (await self._ready()).delete(name)

    async def status(self) -> dict[str, Any]:
        return await (await self._ready()).status()

    async def close(self) -> None:
        if self._controller is not None:
            await self._controller.close()
        if self._cluster is not None:
            await self._cluster.close()
        self._controller = self._cluster = None


class RayBackend:
    """The server's ModelBackend (and admin target) over the controller actor."""

    def __init__(self, handle: Any, events: ClusterEvents | None = None) -> None:
        self.handle = handle
        self.events = events
        self._info: dict[str, ModelInfo] = {}
        self._tokenizers: dict[str, Any] = {}
        self._gauges: dict[str, EngineStats] = {}
        self._states: dict[str, ModelState] = {}
        self._refresher: asyncio.Task[None] | None = None

    @classmethod
    def spawn(cls, config: RayControllerConfig, events: ClusterEvents | None = None) -> RayBackend:
        """Start the controller actor on this (the head) node; Ray restarts it if it dies."""
        ray = import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        actor = ray.remote(ControllerActor).options(
            name=ACTOR_NAME,
            namespace=NAMESPACE,
            num_cpus=0,
            max_restarts=-1,
            max_concurrency=10_000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        return cls(actor.remote(config), events)

    async def _call(self, method: str, *args: Any) -> Any:
        ray = import_ray()
        try:
            return await getattr(self.handle, method).remote(*args)
        except ray.exceptions.RayTaskError as exc:
            raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
        except ray.exceptions.RayActorError as exc:
            raise OverloadedError(f"the controller is restarting: {exc}", retry_after_s=2.0) from exc

    async def start(self, timeout_s: float) -> None:
        """Keep the local copies fresh (each model's state while they start, too); return
        once the minimum instances are ready or failed for good (TimeoutError after
        `timeout_s`: the starts go on)."""
        self._refresher = asyncio.create_task(self._refresh_forever())
        await self._call("wait_ready", timeout_s)
        await self.refresh()

    async def refresh(self) -> None:
        """Copy the deployments' ModelInfo and gauges, and replay scale events."""
        entries: list[ModelEntry] = await self._call("models")
        info = {}
        for e in entries:
            old = self._info.get(e.name)
            if old is not None and (old.max_model_len, old.created) == (e.max_model_len, e.created):
                info[e.name] = old
                continue
            base = await asyncio.to_thread(model_info, e.name, Path(e.model_dir), e.created, None)
            info[e.name] = ModelInfo(e.name, base.tokenizer, e.max_model_len, e.created)
        self._info = info
        self._gauges = await self._call("gauges")
        self._states = await self._call("model_states")
        for name, args in await self._call("take_events"):
            if self.events is not None:
                getattr(self.events, name)(*args)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("refreshing from the controller failed: %s", exc)

    # -- ModelBackend -----------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return list(self._info.values())

    def model(self, name: str) -> ModelInfo:
        info = self._info.get(name)
        if info is None:
            raise ModelNotFoundError(f"the model '{name}' does not exist", param="model")
        return info

    async def generate(self, model: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        ray = import_ray()
        try:
            async with contextlib.aclosing(ray_deltas(self.handle.generate, model, request)) as deltas:
                async for delta in deltas:  # closed with this stream: an early close cancels it
                    yield delta
        except ray.exceptions.RayTaskError as exc:
            raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None
        except ray.exceptions.RayActorError as exc:
            raise OverloadedError(f"the controller failed mid-stream: {exc}", retry_after_s=2.0) from exc

    def gauges(self) -> dict[str, EngineStats]:
        return dict(self._gauges)

    def model_states(self) -> dict[str, ModelState]:
        """Each deployment's state, as of the last refresh (every second)."""
        return dict(self._states)

    # -- admin ------------------------------------------------------------------------

    async def deploy(self, dep: Deployment) -> Deployment:
        out: Deployment = await self._call("deploy", dep)
        await self.refresh()
        return out

    async def delete(self, name: str) -> None:
        await self._call("delete", name)
        await self.refresh()

    async def status(self) -> dict[str, Any]:
        status: dict[str, Any] = await self._call("status")
        return status

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        with contextlib.suppress(Exception):
            await self._call("close")
        with contextlib.suppress(Exception):
            import_ray().kill(self.handle, no_restart=True)
