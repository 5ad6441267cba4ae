"""Controller: the serverless control plane, behind the server's ModelBackend seam.

It keeps the deployments (in ClusterState), has instances started where the
placement policy says (startup-time-aware by default, live migration included;
ember.cluster.instances), routes each request to an instance of its deployment as a
Relay (a stream the controller can move between instances: live migration, node
failure), scales with requests in flight, and lets idle instances go after
keep-alive. A request for a deployment with no ready instance waits while one
starts (at most `start_timeout_s`, then OverloadedError: 503 with Retry-After).
A failed start is retried with a backoff, or never when no retry can fix it
(ember.cluster.start_failures): the deployment is then failed (model_states).

Nodes are NodeRuntimes: every call is a coroutine or an async stream of picklable
messages, so nodes in this process and Ray actors look the same from here. Every
tick also checks each node's health and collects the engines' figures (gauges).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ember.backend import ModelInfo, ModelState
from ember.cluster.autoscaler import Autoscaler
from ember.cluster.config import ControllerConfig as ControllerConfig
from ember.cluster.estimator import StartupTimeEstimator
from ember.cluster.events import ClusterEvents, NoEvents
from ember.cluster.instances import Instances
from ember.cluster.messages import InstanceInfo
from ember.cluster.migration_cost import MigrationCost
from ember.cluster.model_files import model_info, write_model_dir
from ember.cluster.placement import PlacementPolicy, make_policy
from ember.cluster.relay import Relay
from ember.cluster.router import Route, Router
from ember.cluster.runtime import NodeRuntime
from ember.cluster.start_failures import StartFailures
from ember.cluster.state import ClusterState, Deployment
from ember.cluster.status import cluster_status
from ember.engine.request import EngineRequest, EngineStats, RequestOutput
from ember.env import ember_home
from ember.errors import (
    EmberError,
    InstanceFailedError,
    InvalidRequestError,
    ModelNotFoundError,
    NodeFailedError,
    OverloadedError,
    is_permanent,
)

log = logging.getLogger(__name__)


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
        migration_cost: MigrationCost | None = None,
    ) -> None:
        if not nodes:
            raise InvalidRequestError("a cluster needs at least one node", param="nodes")
        self.nodes = {n.node_id: n for n in nodes}
        self.state = state if state is not None else ClusterState()
        self.clock = clock
        self.config = config or ControllerConfig()
        self.estimator = estimator if estimator is not None else StartupTimeEstimator(clock=clock)
        self.migration_cost = migration_cost or MigrationCost()  # calibrated by every migration
        if isinstance(policy, str):
            cost = self.migration_cost if self.config.migrate else None
            policy = make_policy(policy, self.estimator, migration=cost)
        self.policy = policy
        self.events: ClusterEvents = events or NoEvents()
        self.model_root = model_root or ember_home() / "cluster" / "models"
        self.autoscaler = Autoscaler(clock)
        self.router = Router(clock)
        self._deps: dict[str, Deployment] = {}
        self._info: dict[str, ModelInfo] = {}
        self.starts = StartFailures(clock)  # each deployment's failed starts: backoff, failed for good
        self._unusable: dict[str, Deployment] = {}  # its model could not even be read: failed
        self._waiting: Counter[str] = Counter()
        self._stats: dict[str, EngineStats] = {}  # instance id -> its engine's, at the last collection
        self.instances = Instances(
            self.nodes, router=self.router, state=self.state, estimator=self.estimator, policy=self.policy,
            cost=self.migration_cost, events=self.events, config=self.config,
            deployment=self._deps.get, starts=self.starts, waiting=self._waiting.__getitem__,
        )  # fmt: skip
        self._changed = self.instances.changed
        self._ticker: asyncio.Task[None] | None = None

    # -- life cycle -------------------------------------------------------------------

    async def start(self, deployments: Sequence[Deployment] = ()) -> None:
        """Probe every node's bandwidths, adopt the stored deployments, add `deployments`
        that are not stored yet, and start their minimum instances."""
        for probe in await asyncio.gather(*(n.probe_bandwidth() for n in self.nodes.values())):
            self.estimator.calibrate(probe)
        for dep in self.state.deployments():
            await self._adopt_or_fail(dep, store=False)
        for dep in deployments:
            if dep.name not in self._deps and dep.name not in self._unusable:
                await self._adopt_or_fail(dep, store=True)
        self.reconcile()
        if self.config.tick_s is not None:
            self._ticker = asyncio.create_task(self._tick(self.config.tick_s))

    async def wait_ready(self, timeout_s: float) -> None:
        """Until every deployment has its minimum instances ready or has failed for good
        (a failed start that will be retried is waited for); TimeoutError after `timeout_s`."""

        def done() -> bool:
            return all(
                self.starts.permanent(name) is not None
                or sum(r.ready for r in self.router.routes(name)) >= dep.min_instances
                for name, dep in self._deps.items()
            )

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(done), timeout_s)

    def model_states(self) -> dict[str, ModelState]:
        """Every deployment's state: ready (an instance is, or it is scaled to zero),
        starting (with the last failure and the next try, if a start failed) or failed."""
        states = {
            name: self.starts.state(
                name, ready=any(r.ready for r in self.router.routes(name)), min_instances=dep.min_instances
            )
            for name, dep in self._deps.items()
        }
        for name in self._unusable:
            states[name] = self.starts.state(name, ready=False, min_instances=1)
        return states

    async def settle(self) -> None:
        """Until no instance is starting, moving or stopping (for tests and shutdown)."""
        while self.instances.tasks:
            await asyncio.gather(*list(self.instances.tasks), return_exceptions=True)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for task in list(self.instances.tasks):
            task.cancel()
        await asyncio.gather(*list(self.instances.tasks), return_exceptions=True)
        await asyncio.gather(*(n.close() for n in self.nodes.values()), return_exceptions=True)
        for route in self.router.routes():
            self.instances.record_dead(route.instance_id)
            self.router.remove(route.instance_id)

    # -- membership: nodes joining and leaving (the Ray runtime's watcher) -------------

    async def add_node(self, node: NodeRuntime) -> None:
        """A node that joined: probe its bandwidths, then place instances there too."""
        self.estimator.calibrate(await node.probe_bandwidth())
        self.nodes[node.node_id] = node
        self.instances.down.discard(node.node_id)
        self.reconcile()
        await self.instances.notify()

    async def remove_node(self, node_id: str) -> None:
        """A node that is gone: place nothing there; its instances are dead and the
        requests they served resume elsewhere from their tokens (as after any node
        failure); the autoscaler replaces the instances."""
        if node_id not in self.nodes:
            return
        self.instances.mark_down(node_id, NodeFailedError(f"node {node_id} left the cluster", node=node_id))
        del self.nodes[node_id]
        self.instances.down.discard(node_id)
        log.warning("node %s removed; its instances are dead", node_id)
        self.reconcile()
        await self.instances.notify()

    # -- deployments ------------------------------------------------------------------

    async def deploy(self, dep: Deployment) -> Deployment:
        """Create or update a deployment, all or nothing: CheckpointNotFoundError if no
        node or registry has its model, ClusterStateError if the database write fails;
        either way nothing changed, in the database or here."""
        info = await self._model_info(dep)
        self.state.put_deployment(dep)  # the database first; from here on nothing can fail
        self._install(dep, info)
        self.starts.forget(dep.name)  # deployed again: whatever failed may be fixed
        self._unusable.pop(dep.name, None)
        self.reconcile(dep.name)
        return dep

    async def delete(self, name: str) -> None:
        """Stop taking requests for `name`; its instances go once their requests finish.
        All or nothing, as deploy()."""
        if name in self._unusable:  # failed at start-up: never ran
            with contextlib.suppress(ModelNotFoundError):  # a --model that was never stored
                self.state.delete_deployment(name)
            del self._unusable[name]
            self.starts.forget(name)
            return
        if name not in self._deps:
            raise ModelNotFoundError(f"no deployment named {name!r}", param="name")
        self.state.delete_deployment(name)
        self.starts.forget(name)
        del self._deps[name], self._info[name]
        self.instances.failures.pop(name, None)
        for route in self.router.routes(name):
            self.router.drain(route.instance_id)
            if route.ready:  # a loading one stops itself once loaded
                self.instances.spawn(self.instances.stop(route))
        await self.instances.notify()

    def deployments(self) -> list[Deployment]:
        return list(self._deps.values())

    async def _model_info(self, dep: Deployment) -> ModelInfo:
        """The deployment's ModelInfo from its model's files (written under model_root,
        which is a cache: nothing here says the deployment exists)."""
        live = [n for n in self.nodes.values() if n.node_id not in self.instances.down]
        if not live:
            raise NodeFailedError("every node of the cluster is down")
        files = await live[0].model_files(dep.model)
        model_dir = await asyncio.to_thread(write_model_dir, self.model_root, dep.model, files)
        old = self._info.get(dep.name)
        created = old.created if old is not None else int(time.time())
        return await asyncio.to_thread(model_info, dep.name, model_dir, created, self.config.max_model_len)

    async def _adopt(self, dep: Deployment) -> None:
        """Serve `dep` (a deployment the database already has) from here on."""
        self._install(dep, await self._model_info(dep))

    def _install(self, dep: Deployment, info: ModelInfo) -> None:
        self._info[dep.name] = info
        self._deps[dep.name] = dep

    async def _adopt_or_fail(self, dep: Deployment, *, store: bool) -> None:
        """Adopt (and with `store`, deploy) `dep` at start-up; a model that cannot be
        read for good (a missing or corrupt checkpoint) leaves `dep` failed, not the
        controller unstarted."""
        try:
            await (self.deploy(dep) if store else self._adopt(dep))
        except Exception as exc:
            if not is_permanent(exc):
                raise
            log.error("deployment %s cannot start: %s", dep.name, exc)
            self._unusable[dep.name] = dep
            self.starts.failed(dep.name, exc, began=self.clock())

    def _set_context(self, name: str, max_model_len: int) -> None:
        info = self._info.get(name)
        if info is not None and info.max_model_len != max_model_len:
            self._info[name] = dataclasses.replace(info, max_model_len=max_model_len)

    # -- the ModelBackend seam --------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        return list(self._info.values())

    def model(self, name: str) -> ModelInfo:
        info = self._info.get(name)
        if info is None:
            failure = self.starts.permanent(name) if name in self._unusable else None
            if failure is not None:
                raise failure
            raise ModelNotFoundError(f"the model '{name}' does not exist", param="model")
        return info

    async def generate(self, model: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """The request's deltas from an instance of `model`; the request may move to
        another instance meanwhile (live migration, a failed node): one stream still."""
        self.model(model)
        relay = Relay(request, await self._route(model), self)
        async with contextlib.aclosing(relay.stream()) as stream:
            async for delta in stream:
                yield delta

    def gauges(self) -> dict[str, EngineStats]:
        """Per deployment, its ready instances' engine figures as last collected
        (collect_gauges, every tick), and the requests waiting for an instance."""
        out = {}
        for name in self._deps:
            stats = [self._stats_of(r) for r in self.router.routes(name) if r.ready]
            out[name] = EngineStats.total(stats, extra_waiting=self._waiting[name])
        return out

    async def collect_gauges(self) -> dict[str, EngineStats]:
        """Ask the node of every ready instance for its engine figures (all at once),
        keep them for gauges(), and return gauges()."""
        routes = [r for r in self.router.routes() if r.ready]
        stats = await asyncio.gather(*(self._engine_stats(r) for r in routes))
        self._stats = {r.instance_id: s for r, s in zip(routes, stats, strict=True) if s is not None}
        return self.gauges()

    async def _engine_stats(self, route: Route) -> EngineStats | None:
        """None when the instance stopped meanwhile or its node does not answer: whether
        the node is down is the health check's to decide. An instance whose engine died
        is stopped here, even when no request of its noticed."""
        try:
            stats = self.node(route).engine_stats(route.instance_id)
            return await asyncio.wait_for(stats, self.config.health_timeout_s)
        except InstanceFailedError as exc:
            self.instances.mark_down(exc.node or route.node or "", exc)
            return None
        except (EmberError, TimeoutError):
            return None

    def _stats_of(self, route: Route) -> EngineStats:
        stats = self._stats.get(route.instance_id)
        if stats is None:  # not collected yet: what the router knows
            return EngineStats(route.in_flight, 0, 0.0, 0, 0, 0, 0, 0, 0)
        return stats

    async def status(self) -> dict[str, Any]:
        """What `ember status --json` prints: deployments with live instances, live nodes."""
        statuses = await self.instances.statuses()
        deployments = self.deployments() + list(self._unusable.values())
        return cluster_status(deployments, self.router.routes(), statuses, self._waiting, self.model_states())

    # -- relays (ember.cluster.relay.RelayHost) ---------------------------------------

    def node(self, route: Route) -> NodeRuntime:
        return self.instances.node(route.node)

    def attach(self, relay: Relay, route: Route) -> None:
        self.instances.attach(relay, route)
        self.reconcile(route.deployment)  # more in flight: maybe another instance

    async def detach(self, relay: Relay, route: Route) -> None:
        await self.instances.detach(relay, route)

    def node_failed(self, route: Route, error: NodeFailedError) -> None:
        self.instances.mark_down(error.node or route.node or "", error)

    async def failover(self, relay: Relay, failed: Route, error: NodeFailedError) -> Route:
        try:
            route = await self._route(failed.deployment)
        except Exception as e:
            if self.starts.permanent(failed.deployment) is e:  # failed for good: what a new request gets
                raise
            message = (
                f"node {failed.node} failed while serving this request and no other instance of "
                f"{failed.deployment!r} could take it over: {e}"
            )
            if isinstance(error, InstanceFailedError):  # the node lives on: say what did fail
                message = f"{error.message}; no other instance of {failed.deployment!r} could take over: {e}"
            raise NodeFailedError(message, node=failed.node) from e
        self.events.failed_over(failed.deployment)
        return route

    # -- routing ----------------------------------------------------------------------

    async def _route(self, name: str) -> Route:
        """A ready instance of `name`, waiting (bounded) while one starts; the start's
        error if it failed with no other instance or start left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout_s
        while (route := self.router.pick(name)) is None:
            if name not in self._deps:
                raise ModelNotFoundError(f"the model '{name}' was deleted", param="model")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OverloadedError(
                    f"no instance of {name!r} became ready within {self.config.start_timeout_s:g} s",
                    retry_after_s=5.0,
                )
            await self._wait_for_instance(name, remaining)  # starts one if none is starting
            if self.router.pick(name) is None and (error := self._failed(name)) is not None:
                raise error
        return route

    def _failed(self, name: str) -> BaseException | None:
        """Why `name` cannot start, once no instance or start of it is left."""
        if self.router.routes(name) or self.instances.placing[name]:
            return None
        return self.instances.failures.get(name)

    async def _wait_for_instance(self, name: str, timeout_s: float) -> None:
        """Until an instance of `name` is ready, it is deleted, its start failed, or
        `timeout_s`; a waiting request counts as demand (reconcile starts one). The
        caller looks again: a new start may have begun meanwhile."""
        self._waiting[name] += 1
        try:
            self.reconcile(name)

            def settled() -> bool:
                gone = name not in self._deps
                return gone or self._failed(name) is not None or self.router.pick(name) is not None

            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait_for(settled), timeout_s)
        finally:
            self._waiting[name] -= 1

    # -- scaling ----------------------------------------------------------------------

    def reconcile(self, name: str | None = None) -> None:
        """Start the instances each deployment lacks (each is placed first, and is an
        instance only once it has a node); stop idle ones past keep-alive."""
        for dep in [self._deps[name]] if name in self._deps else self.deployments():
            starting = self.instances.placing[dep.name]
            plan = self.autoscaler.plan(dep, self.router.loads(dep.name), self._waiting[dep.name], starting)
            # a failed start is retried once its backoff has passed (a later tick), or never
            for _ in range(plan.start if self.starts.may_start(dep.name) else 0):
                # Counted as starting before any await, so a second request sees it and waits.
                start = self.instances.scale_up(dep, functools.partial(self._wants_more, dep.name))
                self.instances.spawn(self._start(start))
            for instance_id in plan.stop:
                route_ = self.router.get(instance_id)
                if route_ is not None:
                    self.router.drain(instance_id)
                    self.instances.spawn(self.instances.stop(route_))
        self.instances.stop_orphans()

    def _wants_more(self, name: str) -> bool:
        """Whether `name` still needs every instance it has and is starting: a start
        waiting for a slot gives up once this is False."""
        dep = self._deps.get(name)
        if dep is None:
            return False
        loads = self.router.loads(name)
        wanted = self.autoscaler.wanted(dep, sum(i.in_flight for i in loads), self._waiting[name])
        return len(loads) + self.instances.placing[name] <= wanted

    async def _start(self, starting: Awaitable[InstanceInfo | None]) -> None:
        info = await starting
        if info is not None:
            self._set_context(info.deployment, info.max_model_len)

    async def _tick(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.instances.statuses()  # the health check: marks unresponsive nodes down
                self.reconcile()
                await self.collect_gauges()
            except Exception:
                log.exception("autoscaler tick failed")
