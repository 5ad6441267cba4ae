"""Instances: starting, stopping and live-migrating a cluster's instances; node health.

It starts an instance where the placement policy says (or on a given node), waits
(bounded) while every node is full, carries out a "migrate" placement (live-migrate
the victim instance to the free node, then stop it so its slot frees), and stops
instances once their requests are done. A node that raises NodeFailedError or whose
status() fails or times out is marked down: nothing is placed there any more, its
routes go, its instance records are dead, and the relays it served are interrupted
so they resume elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from ember.cluster.autoscaler import Autoscaler
from ember.cluster.config import ControllerConfig
from ember.cluster.estimator import StartupTimeEstimator
from ember.cluster.events import ClusterEvents
from ember.cluster.messages import InstanceInfo, NodeStatus
from ember.cluster.migration import LiveMigration, MigrationReport
from ember.cluster.migration_cost import MigrationCost
from ember.cluster.placement import NodeView, Placement, PlacementPolicy, RunningInstance
from ember.cluster.relay import Relay
from ember.cluster.router import Route, Router
from ember.cluster.runtime import NodeRuntime
from ember.cluster.start_failures import StartFailures
from ember.cluster.state import ClusterState, Deployment, InstanceRecord, LoadRecord
from ember.errors import NodeFailedError, OverloadedError

log = logging.getLogger(__name__)


class Instances:
    """The instances of every deployment on the cluster's nodes (see the module doc)."""

    def __init__(
        self,
        nodes: dict[str, NodeRuntime],
        *,
        router: Router,
        state: ClusterState,
        estimator: StartupTimeEstimator,
        policy: PlacementPolicy,
        cost: MigrationCost,
        autoscaler: Autoscaler,
        events: ClusterEvents,
        config: ControllerConfig,
        deployment: Callable[[str], Deployment | None],
        starts: StartFailures | None = None,
    ) -> None:
        self.nodes = nodes
        self.router = router
        self.state = state
        self.estimator = estimator
        self.policy = policy
        self.cost = cost
        self.autoscaler = autoscaler
        self.events = events
        self.config = config
        self.deployment = deployment
        self.failures: dict[str, BaseException] = {}  # deployment -> why its last start failed
        self.starts = starts if starts is not None else StartFailures()  # backoff; failed for good
        self.relays: dict[str, set[Relay]] = {}  # instance id -> the requests it serves
        self.down: set[str] = set()
        self.changed = asyncio.Condition()
        self.tasks: set[asyncio.Task[None]] = set()
        self._sizes: dict[str, int] = {}
        self._migrating: set[str] = set()
        self._sources: dict[str, Route] = {}  # a migration's destination instance id -> its source

    # -- nodes ------------------------------------------------------------------------

    def node(self, node_id: str | None) -> NodeRuntime:
        """A live node's runtime; NodeFailedError if it is down."""
        if node_id is None or node_id in self.down or node_id not in self.nodes:
            raise NodeFailedError(f"node {node_id} is down", node=node_id)
        return self.nodes[node_id]

    async def statuses(self) -> list[NodeStatus]:
        """The live nodes' statuses; a node whose status() fails or takes longer than the
        health timeout is marked down (the health check)."""
        live = [n for n in self.nodes.values() if n.node_id not in self.down]
        timeout = self.config.health_timeout_s
        results = await asyncio.gather(
            *(asyncio.wait_for(n.status(), timeout) for n in live), return_exceptions=True
        )
        out = []
        for node, result in zip(live, results, strict=True):
            if isinstance(result, Exception):
                self.mark_down(node.node_id, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                out.append(result)
        return out

    def mark_down(self, node_id: str, error: BaseException) -> None:
        """Place nothing on `node_id` again, drop its routes and instances, and interrupt
        the requests it served (they resume elsewhere)."""
        if node_id in self.down or node_id not in self.nodes:
            return
        self.down.add(node_id)
        log.error("node %s is down: %s", node_id, error or type(error).__name__)
        failure = error if isinstance(error, NodeFailedError) else NodeFailedError(
            f"node {node_id} stopped answering: {error or type(error).__name__}", node=node_id
        )  # fmt: skip
        for route in self.router.on_node(node_id):
            self.state.set_instance_state(route.instance_id, "dead")
            self.router.remove(route.instance_id)
            source = self._sources.pop(route.instance_id, None)
            if source is not None:  # a migration's destination died: its source serves on
                source.draining = False
            for relay in list(self.relays.get(route.instance_id, ())):
                relay.interrupt(failure)
        self.spawn(self.notify())

    # -- relays -----------------------------------------------------------------------

    def attach(self, relay: Relay, route: Route) -> None:
        self.router.begin(
            route, len(relay.request.prompt_token_ids) + relay.request.sampling_params.max_tokens
        )
        self.relays.setdefault(route.instance_id, set()).add(relay)

    async def detach(self, relay: Relay, route: Route) -> None:
        self.router.end(route)
        serving = self.relays.get(route.instance_id)
        if serving is not None:
            serving.discard(relay)
            if not serving:
                del self.relays[route.instance_id]
        await self.notify()  # a draining instance may be waiting for this one

    # -- starting ---------------------------------------------------------------------

    async def start(self, dep: Deployment, route: Route) -> InstanceInfo | None:
        """Start the instance `route` stands for (on route.node if set, else where the
        policy places it); on failure record why, drop the route and return None."""
        self.failures.pop(dep.name, None)
        began = self.starts.clock()
        self.events.scaled(dep.name, "up")
        token = None
        started = False
        try:
            nbytes = await self.size(dep.model)
            if route.node is None:
                placement = await self.place(dep, nbytes)
                route.node = placement.node  # takes the slot in view() before any await
            else:
                status = await self.node(route.node).status()
                est = self.estimator.estimate(status, dep.model, nbytes)
                placement = Placement("start", route.node, est.tier, est.total_s, est)
            token = self.estimator.begin(placement.estimate)
            self.state.add_instance(
                InstanceRecord(route.instance_id, dep.name, placement.node, "loading", time.time())
            )
            node = self.node(placement.node)
            info = await node.start_instance(route.instance_id, dep.name, dep.model, cold=placement.cold)
            started = True
            self._check_live(route, placement.node)
            if info.loading:  # serving while its weights arrive: requests go to it now
                self.state.set_instance_state(route.instance_id, "ready")
                self.router.set_ready(route.instance_id)
                await self.notify()
                info = await node.instance_loaded(route.instance_id)
                self._check_live(route, placement.node)
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
            self.router.set_ready(route.instance_id)
            self.starts.succeeded(dep.name)
            if route.draining:  # deleted while it loaded
                self.spawn(self.stop(route))
            return info
        except Exception as exc:
            log.error("starting an instance of %s failed: %s", dep.name, exc)
            if token is not None:
                self.estimator.cancel(token)
            if isinstance(exc, NodeFailedError) and route.node is not None:
                self.mark_down(exc.node or route.node, exc)
            if route.node is not None:
                self.state.set_instance_state(route.instance_id, "dead")
            if started and not isinstance(exc, NodeFailedError):  # e.g. its weights failed their checksums
                self.spawn(self._discard(route.node, route.instance_id))
            self.router.remove(route.instance_id)
            self.failures[dep.name] = exc
            if self.deployment(dep.name) is not None:  # before anyone wakes: no start in its backoff
                self.starts.failed(dep.name, exc, began)
                if self.starts.permanent(dep.name) is not None:
                    log.error("deployment %s failed for good; no start is retried", dep.name)
            return None
        finally:
            await self.notify()

    async def place(self, dep: Deployment, nbytes: int) -> Placement:
        """A node to start on; waits (bounded) while every node is full, migrating a
        running instance away when the policy says that is fastest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout_s
        while True:
            statuses = await self.statuses()
            if not statuses:
                raise NodeFailedError("every node of the cluster is down")
            placement = self.policy.place(dep.model, nbytes, [self.view(s) for s in statuses])
            if placement is not None and placement.action == "start":
                return placement
            if placement is not None and placement.action == "migrate":
                assert placement.migrate_instance is not None and placement.migrate_to is not None
                self.begin_migration(placement.migrate_instance, placement.migrate_to)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OverloadedError(f"no free instance slot for {dep.name!r} on any node", retry_after_s=10)
            wait = remaining if placement is None else min(remaining, max(placement.wait_s, 0.05))
            async with self.changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), wait)

    def view(self, status: NodeStatus) -> NodeView:
        """A node as placement sees it; slots count this controller's instances, so two
        placements in a row never take one slot twice."""
        mine = self.router.on_node(status.node_id)
        free = max(0, min(status.free_slots, status.slots - len(mine)))
        running, free_in = [], math.inf
        for r in mine:
            dep = self.deployment(r.deployment)
            if r.draining:
                free_in = min(free_in, 0.0 if r.in_flight == 0 else math.inf)
            elif dep is not None and r.ready:
                load = next((i for i in self.router.loads(dep.name) if i.instance_id == r.instance_id), None)
                live = len(self.router.loads(dep.name))
                if load is not None and live > dep.min_instances:
                    free_in = min(free_in, max(0.0, self.autoscaler.expires_in(dep, load)))
                relays = self.relays.get(r.instance_id, ())
                if r.in_flight > 0 and relays:
                    size = self._sizes.get(dep.model, 0)
                    tokens = max(relay.num_tokens for relay in relays)
                    running.append(RunningInstance(r.instance_id, dep.model, size, tokens))
        return NodeView(dataclasses.replace(status, free_slots=free), tuple(running), free_in)

    # -- migrating --------------------------------------------------------------------

    def begin_migration(self, instance_id: str, to_node: str) -> None:
        if instance_id not in self._migrating:
            self._migrating.add(instance_id)
            self.spawn(self._migrate(instance_id, to_node))

    async def _migrate(self, instance_id: str, to_node: str) -> None:
        try:
            await self.migrate(instance_id, to_node)
        except Exception:
            log.exception("migrating instance %s failed", instance_id)
        finally:
            self._migrating.discard(instance_id)

    async def migrate(self, instance_id: str, to_node: str) -> MigrationReport | None:
        """Live-migrate the instance's requests to a new instance on `to_node`, then stop
        it once empty (its slot frees). If the destination fails, the source goes on
        serving; None if nothing was moved at all."""
        src = self.router.get(instance_id)
        dep = self.deployment(src.deployment) if src is not None else None
        if src is None or dep is None or not src.ready or src.draining or to_node in self.down:
            return None
        self.router.drain(instance_id)  # no new requests: they go to the destination
        dest = self.router.add(uuid.uuid4().hex[:12], dep.name)
        dest.node = to_node
        self._sources[dest.instance_id] = src
        try:
            return await self._move_to(dep, src, dest)
        finally:
            self._sources.pop(dest.instance_id, None)
            await self.notify()

    async def _move_to(self, dep: Deployment, src: Route, dest: Route) -> MigrationReport | None:
        to_node = dest.node
        assert to_node is not None
        if await self.start(dep, dest) is None:
            src.draining = False
            return None
        relays = [r for r in self.relays.get(src.instance_id, ()) if r.active]
        migration = LiveMigration(
            self.node(src.node), src, self.nodes[to_node], dest, self.cost, self.config.migration
        )
        report = await migration.move(relays)
        if report.dest_error is not None:
            self.mark_down(to_node, report.dest_error)
        self.events.migrated(dep.name, report.moved, report.stayed)
        log.info(
            "migrated instance %s of %s from %s to %s: %d moved, %d stayed, %d finished first",
            src.instance_id, dep.name, src.node, to_node, report.moved, report.stayed, report.finished,
        )  # fmt: skip
        if self.router.get(dest.instance_id) is dest:
            self.spawn(self.stop(src))  # once its last requests are done
        else:  # the destination died: the source stays
            src.draining = False
        return report

    # -- stopping ---------------------------------------------------------------------

    async def stop(self, route: Route) -> None:
        """Stop an instance once its requests are done, and forget it."""
        try:
            async with self.changed:
                await self.changed.wait_for(lambda: route.in_flight == 0)
            if route.node is not None and route.node not in self.down:
                await self.nodes[route.node].stop_instance(route.instance_id)
            self.state.set_instance_state(route.instance_id, "dead")
            self.events.scaled(route.deployment, "down")
            log.info("instance %s of %s stopped", route.instance_id, route.deployment)
        except NodeFailedError as exc:
            self.mark_down(exc.node or route.node or "", exc)
        except Exception:
            log.exception("stopping instance %s failed", route.instance_id)
        finally:
            self.router.remove(route.instance_id)
            await self.notify()

    # -- helpers ----------------------------------------------------------------------

    async def size(self, model: str) -> int:
        if model not in self._sizes:
            live = [n for n in self.nodes.values() if n.node_id not in self.down]
            if not live:
                raise NodeFailedError("every node of the cluster is down")
            self._sizes[model] = await live[0].checkpoint_size(model)
        return self._sizes[model]

    def _check_live(self, route: Route, node: str) -> None:
        if self.router.get(route.instance_id) is not route:  # its node went down meanwhile
            raise NodeFailedError(f"node {node} went down while loading", node=node)

    async def _discard(self, node_id: str | None, instance_id: str) -> None:
        """Stop an instance that started but cannot serve (its load failed)."""
        if node_id is None or node_id in self.down:
            return
        try:
            await self.nodes[node_id].stop_instance(instance_id)
        except Exception as exc:
            log.warning("stopping failed instance %s on %s: %s", instance_id, node_id, exc)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()
