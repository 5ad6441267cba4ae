"""Controller: the serverless control plane, behind the server's ModelBackend seam.

It keeps the deployments (in ClusterState), starts instances where the placement
policy says (startup-time-aware by default), routes each request to an instance of
its deployment, scales with requests in flight, and lets idle instances go after
keep-alive. A request for a deployment with no ready instance waits while one
starts (at most `start_timeout_s`, then OverloadedError: 503 with Retry-After).

Nodes are NodeRuntimes: every call is a coroutine or an async stream of picklable
messages, so nodes in this process and Ray actors look the same from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ember.cluster.autoscaler import Autoscaler
from ember.cluster.estimator import StartupTimeEstimator
from ember.cluster.events import ClusterEvents, NoEvents
from ember.cluster.messages import NodeStatus
from ember.cluster.model_files import model_info, write_model_dir
from ember.cluster.placement import NodeView, Placement, PlacementPolicy, RunningInstance, make_policy
from ember.cluster.router import Route, Router
from ember.cluster.runtime import NodeRuntime
from ember.cluster.state import ClusterState, Deployment, InstanceRecord, LoadRecord
from ember.cluster.status import cluster_status
from ember.engine.request import EngineRequest, EngineStats, RequestOutput
from ember.env import ember_home
from ember.errors import InvalidRequestError, ModelNotFoundError, OverloadedError
from ember.server.backend import ModelInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControllerConfig:
    start_timeout_s: float = 300.0  # how long a request waits for a cold start before a 503
    tick_s: float | None = 1.0  # autoscaler period; None: only on requests (tests call reconcile())
    max_model_len: int | None = None  # the engines' context cap, for ModelInfo before a load


class Controller:
    """Deployments, placement, autoscaling and routing over a set of nodes."""

    def __init__(
        self,
        nodes: Sequence[NodeRuntime],
        *,
        state: ClusterState | None = None,
        policy: str | PlacementPolicy = "startup-time-aware",
        estimator: StartupTimeEstimator | None = None,
        config: ControllerConfig | None = None,
        events: ClusterEvents | None = None,
        clock: Callable[[], float] = time.monotonic,
        model_root: Path | None = None,
    ) -> None:
        if not nodes:
            raise InvalidRequestError("a cluster needs at least one node", param="nodes")
        self.nodes = {n.node_id: n for n in nodes}
        self.state = state if state is not None else ClusterState()
        self.clock = clock
        self.estimator = estimator if estimator is not None else StartupTimeEstimator(clock=clock)
        # No migrator yet: the policy never chooses to migrate.
        self.policy = make_policy(policy, self.estimator) if isinstance(policy, str) else policy
        self.config = config or ControllerConfig()
        self.events: ClusterEvents = events or NoEvents()
        self.model_root = model_root or ember_home() / "cluster" / "models"
        self.autoscaler = Autoscaler(clock)
        self.router = Router(clock)
        self._deps: dict[str, Deployment] = {}
        self._info: dict[str, ModelInfo] = {}
        self._sizes: dict[str, int] = {}
        self._waiting: Counter[str] = Counter()
        self._failures: dict[str, BaseException] = {}
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------

    async def start(self, deployments: Sequence[Deployment] = ()) -> None:
        """Probe every node's bandwidths, adopt the stored deployments, add `deployments`
        that are not stored yet, and start their minimum instances."""
        for probe in await asyncio.gather(*(n.probe_bandwidth() for n in self.nodes.values())):
            self.estimator.calibrate(probe)
        for dep in self.state.deployments():
            await self._adopt(dep)
        for dep in deployments:
            if dep.name not in self._deps:
                await self.deploy(dep)
        self.reconcile()
        if self.config.tick_s is not None:
            self._ticker = asyncio.create_task(self._tick(self.config.tick_s))

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every deployment has its minimum instances ready (or one failed to start)."""

        def done() -> bool:
            return all(
                name in self._failures or sum(r.ready for r in self.router.routes(name)) >= dep.min_instances
                for name, dep in self._deps.items()
            )

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(done), timeout_s)
        for name, exc in self._failures.items():
            log.error("deployment %s failed to start: %s", name, exc)

    async def settle(self) -> None:
        """Until no instance is starting or stopping (for tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await asyncio.gather(*(n.close() for n in self.nodes.values()), return_exceptions=True)
        for route in self.router.routes():
            self.state.set_instance_state(route.instance_id, "dead")
            self.router.remove(route.instance_id)

    # -- membership: nodes joining and leaving (the Ray runtime's watcher) -------------

    async def add_node(self, node: NodeRuntime) -> None:
        """A node that joined: probe its bandwidths, then place instances there too."""
        self.estimator.calibrate(await node.probe_bandwidth())
        self.nodes[node.node_id] = node
        self.reconcile()
        await self._notify()

    async def remove_node(self, node_id: str) -> None:
        """A node that is gone: place nothing there; its instances are dead (their
        streams end with the node's NodeFailedError); the autoscaler replaces them."""
        if self.nodes.pop(node_id, None) is None:
            return
        for route in self.router.on_node(node_id):
            self.state.set_instance_state(route.instance_id, "dead")
            self.router.remove(route.instance_id)
        log.warning("node %s removed; its instances are dead", node_id)
        self.reconcile()
        await self._notify()

    # -- deployments ------------------------------------------------------------------

    async def deploy(self, dep: Deployment) -> Deployment:
        """Create or update a deployment. CheckpointNotFoundError if no node or registry
        has its model."""
        await self._adopt(dep)
        self.state.put_deployment(dep)
        self.reconcile(dep.name)
        return dep

    async def delete(self, name: str) -> None:
        """Stop taking requests for `name`; its instances go once their requests finish."""
        if name not in self._deps:
            raise ModelNotFoundError(f"no deployment named {name!r}", param="name")
        self.state.delete_deployment(name)
        del self._deps[name], self._info[name]
        self._failures.pop(name, None)
        for route in self.router.routes(name):
            self.router.drain(route.instance_id)
            if route.ready:  # a loading one stops itself once loaded
                self._spawn(self._stop_instance(route))
        await self._notify()

    def deployments(self) -> list[Deployment]:
        return list(self._deps.values())

    async def _adopt(self, dep: Deployment) -> None:
        files = await next(iter(self.nodes.values())).model_files(dep.model)
        model_dir = await asyncio.to_thread(write_model_dir, self.model_root, dep.model, files)
        old = self._info.get(dep.name)
        created = old.created if old is not None else int(time.time())
        self._info[dep.name] = await asyncio.to_thread(
            model_info, dep.name, model_dir, created, self.config.max_model_len
        )
        self._deps[dep.name] = dep

    # -- the ModelBackend seam --------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return list(self._info.values())

    def model(self, name: str) -> ModelInfo:
        info = self._info.get(name)
        if info is None:
            raise ModelNotFoundError(f"the model '{name}' does not exist", param="model")
        return info

    async def generate(self, model: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.model(model)
        route = await self._route(model)
        assert route.node is not None
        tokens = len(request.prompt_token_ids) + request.sampling_params.max_tokens
        try:
            with self.router.track(route, tokens):
                self.reconcile(model)  # more in flight: maybe another instance
                stream = self.nodes[route.node].generate(route.instance_id, request)
                try:
                    async for delta in stream:
                        yield delta
                finally:
                    aclose = getattr(stream, "aclose", None)
                    if aclose is not None:
                        await aclose()  # the node aborts a request left unfinished
        finally:
            await self._notify()  # a draining instance may be waiting for this one

    def gauges(self) -> dict[str, EngineStats]:
        out = {}
        for name in self._deps:
            stats = [self._stats(r) for r in self.router.routes(name) if r.ready]
            out[name] = EngineStats.total(stats, extra_waiting=self._waiting[name])
        return out

    def _stats(self, route: Route) -> EngineStats:
        from ember.cluster.node import EmbeddedNode

        node = self.nodes.get(route.node or "")
        if isinstance(node, EmbeddedNode):
            with contextlib.suppress(ModelNotFoundError):
                return node.engine(route.instance_id).engine.stats()
        return EngineStats(route.in_flight, 0, 0.0, 0, 0, 0, 0, 0, 0)

    async def status(self) -> dict[str, Any]:
        """What `ember status --json` prints: deployments with live instances, nodes."""
        statuses = await asyncio.gather(*(n.status() for n in self.nodes.values()))
        return cluster_status(self.deployments(), self.router.routes(), statuses)

    # -- routing ----------------------------------------------------------------------

    async def _route(self, name: str) -> Route:
        route = self.router.pick(name)
        if route is not None:
            return route
        self._waiting[name] += 1
        try:
            self.reconcile(name)

            def settled() -> bool:
                gone = name not in self._deps
                failed = name in self._failures and not self.router.routes(name)
                return gone or failed or self.router.pick(name) is not None

            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(settled), self.config.start_timeout_s)
                except TimeoutError:
                    raise OverloadedError(
                        f"no instance of {name!r} became ready within {self.config.start_timeout_s:g} s",
                        retry_after_s=5.0,
                    ) from None
        finally:
            self._waiting[name] -= 1
        route = self.router.pick(name)
        if route is not None:
            return route
        if name not in self._deps:
            raise ModelNotFoundError(f"the model '{name}' was deleted", param="model")
        raise self._failures[name]

    # -- scaling ----------------------------------------------------------------------

    def reconcile(self, name: str | None = None) -> None:
        """Start the instances each deployment lacks; stop idle ones past keep-alive."""
        for dep in [self._deps[name]] if name in self._deps else self.deployments():
            plan = self.autoscaler.plan(dep, self.router.loads(dep.name), self._waiting[dep.name])
            for _ in range(plan.start):
                # Registered before any await, so a second request sees it and waits.
                route = self.router.add(uuid.uuid4().hex[:12], dep.name)
                self._spawn(self._start_instance(dep, route))
            for instance_id in plan.stop:
                route_ = self.router.get(instance_id)
                if route_ is not None:
                    self.router.drain(instance_id)
                    self._spawn(self._stop_instance(route_))

    async def _tick(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                self.reconcile()
            except Exception:
                log.exception("autoscaler tick failed")

    async def _start_instance(self, dep: Deployment, route: Route) -> None:
        self._failures.pop(dep.name, None)
        self.events.scaled(dep.name, "up")
        token = None
        try:
            nbytes = await self._size(dep.model)
            placement = await self._place(dep, nbytes)
            route.node = placement.node  # takes the slot in _views before any await
            token = self.estimator.begin(placement.estimate)
            self.state.add_instance(
                InstanceRecord(route.instance_id, dep.name, placement.node, "loading", time.time())
            )
            node = self.nodes[placement.node]
            info = await node.start_instance(route.instance_id, dep.name, dep.model, cold=placement.cold)
            observed = self.estimator.finish(token, info)
            token = None
            self.state.add_load(
                LoadRecord(route.instance_id, dep.model, info.node, info.tier, info.nbytes,
                           observed.estimated_s, observed.actual_s, time.time())
            )  # fmt: skip
            self.state.set_instance_state(route.instance_id, "ready")
            self.events.instance_started(dep.name, info, observed)
            log.info(
                "instance %s of %s ready on %s from %s in %.2f s (estimated %.2f s)",
                route.instance_id, dep.name, info.node, info.tier, observed.actual_s, observed.estimated_s,
            )  # fmt: skip
            self._set_context(dep.name, info.max_model_len)
            self.router.set_ready(route.instance_id)
            if route.draining:  # deleted while it loaded
                self._spawn(self._stop_instance(route))
        except Exception as exc:
            log.error("starting an instance of %s failed: %s", dep.name, exc)
            if token is not None:
                self.estimator.cancel(token)
            if route.node is not None:
                self.state.set_instance_state(route.instance_id, "dead")
            self.router.remove(route.instance_id)
            self._failures[dep.name] = exc
        finally:
            await self._notify()

    def _set_context(self, name: str, max_model_len: int) -> None:
        info = self._info.get(name)
        if info is not None and info.max_model_len != max_model_len:
            self._info[name] = dataclasses.replace(info, max_model_len=max_model_len)

    async def _place(self, dep: Deployment, nbytes: int) -> Placement:
        """A node to start on; waits (bounded) while every node is full."""
        deadline = asyncio.get_running_loop().time() + self.config.start_timeout_s
        while True:
            statuses = await asyncio.gather(*(n.status() for n in self.nodes.values()))
            placement = self.policy.place(dep.model, nbytes, [self._view(s) for s in statuses])
            if placement is not None and placement.action == "start":
                return placement
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise OverloadedError(f"no free instance slot for {dep.name!r} on any node", retry_after_s=10)
            wait = remaining if placement is None else min(remaining, max(placement.wait_s, 0.05))
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), wait)

    def _view(self, status: NodeStatus) -> NodeView:
        """A node as placement sees it; slots count this controller's instances, so two
        placements in a row never take one slot twice."""
        mine = self.router.on_node(status.node_id)
        free = max(0, min(status.free_slots, status.slots - len(mine)))
        running, free_in = [], math.inf
        for r in mine:
            dep = self._deps.get(r.deployment)
            if r.draining:
                free_in = min(free_in, 0.0 if r.in_flight == 0 else math.inf)
            elif dep is not None and r.ready:
                load = next((i for i in self.router.loads(dep.name) if i.instance_id == r.instance_id), None)
                live = len(self.router.loads(dep.name))
                if load is not None and live > dep.min_instances:
                    free_in = min(free_in, max(0.0, self.autoscaler.expires_in(dep, load)))
                if r.in_flight > 0:
                    size = self._sizes.get(dep.model, 0)
                    running.append(RunningInstance(r.instance_id, dep.model, size, r.max_tokens_in_flight))
        return NodeView(dataclasses.replace(status, free_slots=free), tuple(running), free_in)

    async def _stop_instance(self, route: Route) -> None:
        try:
            async with self._changed:
                await self._changed.wait_for(lambda: route.in_flight == 0)
            if route.node is not None:
                await self.nodes[route.node].stop_instance(route.instance_id)
            self.state.set_instance_state(route.instance_id, "dead")
            self.events.scaled(route.deployment, "down")
            log.info("instance %s of %s stopped", route.instance_id, route.deployment)
        except Exception:
            log.exception("stopping instance %s failed", route.instance_id)
        finally:
            self.router.remove(route.instance_id)
            await self._notify()

    async def _size(self, model: str) -> int:
        if model not in self._sizes:
            self._sizes[model] = await next(iter(self.nodes.values())).checkpoint_size(model)
        return self._sizes[model]

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
