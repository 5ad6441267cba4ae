"""Instances: placing, starting and live-migrating a cluster's instances.

It starts an instance where the placement policy says (or on a given node), waits
(bounded) while every node is full, stops the idle instances a placement reclaims,
carries out a "migrate" placement (live-migrate the victim instance to the free
node, then stop it so its slot frees). An instance exists (its record in SQLite,
then its route) only once placement gave it a node: a start still waiting for a
slot is a count in `placing`, never a placeholder instance, and gives up when the
demand that asked for it goes. What happens to instances once they run (health,
relays, stopping) is `InstanceSet`, which this extends.
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
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ember.cluster import candidates
from ember.cluster.candidates import Candidates
from ember.cluster.config import ControllerConfig
from ember.cluster.estimator import Observation, StartupTimeEstimator
from ember.cluster.events import ClusterEvents
from ember.cluster.instance_set import InstanceSet
from ember.cluster.messages import InstanceInfo, NodeStatus
from ember.cluster.migration import LiveMigration, MigrationReport
from ember.cluster.migration_cost import MigrationCost
from ember.cluster.placement import IdleInstance, NodeView, Placement, PlacementPolicy, RunningInstance
from ember.cluster.router import Route, Router
from ember.cluster.runtime import NodeRuntime
from ember.cluster.start_failures import StartFailures
from ember.cluster.state import ClusterState, Deployment, InstanceRecord, LoadRecord
from ember.errors import InstanceFailedError, NodeFailedError, OverloadedError

log = logging.getLogger(__name__)


def _random_id() -> str:
    return uuid.uuid4().hex[:12]


class Instances(InstanceSet):
    """Bringing the instances of every deployment up, and moving them (module doc)."""

    def __init__(
        self,
        nodes: dict[str, NodeRuntime],
        *,
        router: Router,
        state: ClusterState,
        estimator: StartupTimeEstimator,
        policy: PlacementPolicy,
        cost: MigrationCost,
        events: ClusterEvents,
        config: ControllerConfig,
        deployment: Callable[[str], Deployment | None],
        starts: StartFailures | None = None,
        new_id: Callable[[], str] | None = None,
        waiting: Callable[[str], int] = lambda deployment: 0,
    ) -> None:
        super().__init__(
            nodes, router=router, state=state, events=events, config=config, deployment=deployment
        )
        self.new_id = new_id or _random_id  # instance ids; inject a counter for reproducible runs
        self.estimator = estimator
        self.policy = policy
        self.cost = cost
        self.waiting = waiting  # deployment -> its requests waiting for an instance
        self.failures: dict[str, BaseException] = {}  # deployment -> why its last start failed
        self.placing: Counter[str] = Counter()  # deployment -> its starts not placed yet (no route)
        self.starts = starts if starts is not None else StartFailures()  # backoff; failed for good
        self._migrating: set[str] = set()  # instances being moved
        self._sizes: dict[str, int] = {}  # model -> checkpoint bytes

    # -- starting ---------------------------------------------------------------------

    def scale_up(
        self, dep: Deployment, wanted: Callable[[], bool]
    ) -> Coroutine[Any, Any, InstanceInfo | None]:
        """A new instance of `dep`, placed then started (run the coroutine as a task).
        Until placement picks its node it is a pending start, counted in `placing` from
        this call on: the autoscaler counts it, `ember status` does not list it (a
        request waiting for a slot is not an instance). It gives up, recording nothing,
        once `wanted()` is False: the demand went, or the deployment did."""
        self.failures.pop(dep.name, None)  # now: a request arriving meanwhile waits for this start
        self.placing[dep.name] += 1
        return self._scale_up(dep, wanted)

    async def _scale_up(self, dep: Deployment, wanted: Callable[[], bool]) -> InstanceInfo | None:
        route = placement = None
        began = self.starts.clock()
        try:
            placement = await self.place(dep, await self.size(dep.model), wanted)
            if placement is not None:
                route = self.add(dep, placement.node)  # before any await: it takes the slot
        except Exception as exc:
            log.error("placing an instance of %s failed: %s", dep.name, exc)
            if not self.router.loads(dep.name):  # else its requests have instances: no failure
                self.failures[dep.name] = exc
                self._start_failed(dep.name, exc, began)
        finally:
            self.placing[dep.name] -= 1
            if self.placing[dep.name] <= 0:
                del self.placing[dep.name]
        if route is None or placement is None:
            await self.notify()
            return None
        return await self.start(dep, route, placement)

    def add(self, dep: Deployment, node: str) -> Route:
        """A new instance of `dep` on `node`, loading: its record first, then its route
        (which takes the slot in view()). ClusterStateError if the record cannot be
        written, and then there is neither."""
        instance_id = self.new_id()
        self.state.add_instance(InstanceRecord(instance_id, dep.name, node, "loading", time.time()))
        return self.router.add(instance_id, dep.name, node)

    async def start(
        self, dep: Deployment, route: Route, placement: Placement | None = None
    ) -> InstanceInfo | None:
        """Start the instance `route` stands for (made by add()) as `placement` says, or
        on route.node (a migration's destination); on failure record why, drop the
        route and return None."""
        self.failures.pop(dep.name, None)
        began = self.starts.clock()
        self.events.scaled(dep.name, "up")
        token = None
        started = False
        try:
            if placement is None:
                nbytes = await self.size(dep.model)
                status = await self.node(route.node).status()
                est = self.estimator.estimate(status, dep.model, nbytes)
                placement = Placement("start", route.node, est.tier, est.total_s, est)
            token = self.estimator.begin(placement.estimate)
            node = self.node(placement.node)
            info = await node.start_instance(route.instance_id, dep.name, dep.model, cold=placement.cold)
            started = True
            self._check_live(route, placement.node)
            if info.loading:  # serving while its weights arrive: requests go to it now
                self.state.set_instance_state(route.instance_id, "ready")
                self.router.set_ready(route.instance_id)
                await self.notify()
                info = await node.instance_loaded(route.instance_id)
                if self._stopped(route):  # reclaimed, idle or deleted meanwhile: its load still counts
                    self._record_load(route, token, info)
                    return None  # not a failed start: stop() records it and frees its slot
                self._check_live(route, placement.node)
            observed = self._record_load(route, token, info)
            token = None
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
            if token is not None:
                self.estimator.cancel(token)
            if started and self._stopped(route):  # as above, and its load ended with it
                log.info("instance %s of %s stopped before its weights were in", route.instance_id, dep.name)
                return None
            log.error("starting an instance of %s failed: %s", dep.name, exc)
            self.failures[dep.name] = exc  # before a request it took hears (below) and asks why
            self._start_failed(dep.name, exc, began)
            if isinstance(exc, NodeFailedError):
                self.mark_down(exc.node or route.node, exc)
            # A streamed start serves while it loads: its requests resume elsewhere or get
            # this error, not the engine's shutdown below. (A node marked down, or a
            # failed instance, was dropped already, its record and relays with it.)
            if self.router.get(route.instance_id) is route:
                self._drop(route, exc if isinstance(exc, NodeFailedError) else InstanceFailedError(
                    f"instance {route.instance_id} on node {route.node} failed while loading: {exc}",
                    node=route.node, instance=route.instance_id,
                ))  # fmt: skip
            if started and not isinstance(exc, NodeFailedError):  # e.g. its weights failed their checksums
                self.spawn(self._discard(route.node, route.instance_id))
            return None
        finally:
            await self.notify()

    def _record_load(self, route: Route, token: int, info: InstanceInfo) -> Observation:
        """A finished load: the estimator learns from it and the database keeps it."""
        observed = self.estimator.finish(token, info)
        self.state.add_load(
            LoadRecord(route.instance_id, info.model, info.node, info.tier, info.nbytes,
                       observed.estimated_s, observed.actual_s, time.time())
        )  # fmt: skip
        return observed

    def _start_failed(self, name: str, exc: BaseException, began: float) -> None:
        if self.deployment(name) is not None:  # before anyone wakes: no start in its backoff
            self.starts.failed(name, exc, began)
            if self.starts.permanent(name) is not None:
                log.error("deployment %s failed for good; no start is retried", name)

    async def place(
        self, dep: Deployment, nbytes: int, wanted: Callable[[], bool] = lambda: True
    ) -> Placement | None:
        """A node to start on; waits (bounded) while every node is full, stopping idle
        instances or migrating a running one away when the policy says so. None as soon
        as `wanted()` is False (checked after every await, so a "start" it returns is
        still wanted)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.start_timeout_s
        while True:
            seen = self.changes
            statuses = await self.statuses()
            if not wanted():
                return None
            if not statuses:
                raise NodeFailedError("every node of the cluster is down")
            placement = self._place(dep, nbytes, statuses)
            if placement is not None and placement.action == "start":
                if not placement.reclaim:
                    return placement
                await self.reclaim(placement.reclaim)  # then place again, on the freed slots
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise OverloadedError(f"no free instance slot for {dep.name!r} on any node", retry_after_s=10)
            if placement is not None and placement.action == "migrate":
                assert placement.migrate_instance is not None and placement.migrate_to is not None
                await self._await_move(placement.migrate_instance, placement.migrate_to, remaining)
                continue
            wait = remaining if placement is None else min(remaining, max(placement.wait_s, 0.05))
            async with self.changed:
                if self.changes == seen:  # nothing (a slot freed) changed while the statuses came
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), wait)

    def _place(self, dep: Deployment, nbytes: int, statuses: list[NodeStatus]) -> Placement | None:
        """The policy's placement over the live nodes, estimating only the nodes it needs
        (ember.cluster.candidates: the same decision as over every node). Every view is
        built, in order: the idle instances a node offers depend on the nodes before it
        (a deployment's min_instances are kept once, see view())."""
        spare: dict[str, int] = {}
        views = {s.node_id: self.view(s, spare) for s in statuses}
        index = Candidates(self.estimator)
        for v in views.values():
            index.update(v.status, sum(i.slots for i in v.idle))
        return candidates.place(self.policy, index, dep.model, nbytes, 1, views.__getitem__)

    async def reclaim(self, instance_ids: Sequence[str]) -> None:
        """Stop idle instances for a start that needs their slots. They drain first, at
        once, so no request and no other placement takes them meanwhile; one that a
        request reached first is left alone. A stop that fails leaves its instance
        serving (stop() says how), and the start places again either way."""
        routes = []
        for instance_id in instance_ids:
            route = self.router.get(instance_id)
            if route is not None and self._stoppable(route):
                self.router.drain(instance_id)
                self.events.reclaimed(route.deployment)
                routes.append(route)
        await asyncio.gather(*(self.stop(r) for r in routes))

    def _stoppable(self, route: Route) -> bool:
        """Idle and needed by nothing in flight: no request on it or on its way to it (its
        deployment's waiting requests), not a migration's destination before its
        hand-over. (A deployment's min_instances is view()'s to keep.)"""
        return (
            route.ready and not route.draining and route.in_flight == 0
            and route.instance_id not in self._sources and not self.waiting(route.deployment)
        )  # fmt: skip

    def view(self, status: NodeStatus, spare: dict[str, int] | None = None) -> NodeView:
        """A node as placement sees it; slots count this controller's instances, so two
        placements in a row never take one slot twice. `spare` (deployment -> idle
        instances it can lose; shared by the views of one placement) keeps a
        deployment's min_instances out of the idle instances a start may stop."""
        spare = {} if spare is None else spare
        mine = self.router.on_node(status.node_id)
        free = max(0, min(status.free_slots, status.slots - len(mine)))
        running, idle, free_in = [], [], math.inf
        now = time.monotonic()  # the relays' clock
        for r in mine:
            dep = self.deployment(r.deployment)
            if r.draining:
                free_in = min(free_in, 0.0 if r.in_flight == 0 else math.inf)
            elif dep is None or not r.ready:
                continue
            elif self._stoppable(r):
                if dep.name not in spare:
                    spare[dep.name] = len(self.router.loads(dep.name)) - dep.min_instances
                if spare[dep.name] > 0:
                    spare[dep.name] -= 1
                    idle.append((r.idle_since or 0.0, IdleInstance(r.instance_id)))
            elif relays := self.relays.get(r.instance_id, ()):
                size = self._sizes.get(dep.model, 0)
                tokens = max(relay.num_tokens for relay in relays)
                idle_in = max(relay.idle_in_s(now) for relay in relays)
                running.append(RunningInstance(r.instance_id, dep.model, size, tokens, idle_in_s=idle_in))
        idle.sort(key=lambda pair: pair[0])  # longest idle first
        status = dataclasses.replace(status, free_slots=free)
        return NodeView(status, tuple(running), free_in, tuple(i for _, i in idle))

    # -- migrating --------------------------------------------------------------------

    def begin_migration(self, instance_id: str, to_node: str) -> None:
        """Move the instance to `to_node` in the background, unless a move is under way."""
        if instance_id not in self._migrating:
            self._migrating.add(instance_id)
            self.spawn(self._migrate(instance_id, to_node))

    async def _await_move(self, instance_id: str, to_node: str, timeout_s: float) -> None:
        """Move the instance for a start that wants its slot, and wait until the slot is
        free (the source gone) or the move ended without freeing it. The start does not
        place again at every change meanwhile, maybe elsewhere, leaving the move (a slot
        and a load on the destination) for nothing."""
        self.begin_migration(instance_id, to_node)

        def settled() -> bool:  # _migrate forgets the move, then notifies
            return instance_id not in self._migrating or self.router.get(instance_id) is None

        async with self.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait_for(settled), timeout_s)

    async def _migrate(self, instance_id: str, to_node: str) -> None:
        try:
            await self.migrate(instance_id, to_node)
        except Exception:
            log.exception("migrating instance %s failed", instance_id)
        finally:
            self._migrating.discard(instance_id)
            await self.notify()  # a start waiting for this move places again

    async def migrate(self, instance_id: str, to_node: str) -> MigrationReport | None:
        """Live-migrate the instance's requests to a new instance on `to_node`, then stop
        it once empty (its slot frees). If the destination fails, the source goes on
        serving; None if nothing was moved at all."""
        src = self.router.get(instance_id)
        dep = self.deployment(src.deployment) if src is not None else None
        if src is None or dep is None or not src.ready or src.draining or to_node in self.down:
            return None
        dest = self.add(dep, to_node)  # ClusterStateError: nothing moved, nothing changed
        self.router.drain(instance_id)  # no new requests: they go to the destination
        self._sources[dest.instance_id] = src
        try:
            return await self._move_to(dep, src, dest)
        finally:
            self._sources.pop(dest.instance_id, None)
            await self.notify()

    async def _move_to(self, dep: Deployment, src: Route, dest: Route) -> MigrationReport | None:
        to_node = dest.node
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

    # -- helpers of starting ----------------------------------------------------------

    async def size(self, model: str) -> int:
        """A model's checkpoint bytes, asked of a live node once."""
        if model not in self._sizes:
            live = [n for n in self.nodes.values() if n.node_id not in self.down]
            if not live:
                raise NodeFailedError("every node of the cluster is down")
            self._sizes[model] = await live[0].checkpoint_size(model)
        return self._sizes[model]

    def _stopped(self, route: Route) -> bool:
        """Whether a stop() took the instance (it drained it first, then removes it)."""
        taken = route.instance_id in self.stopping or self.router.get(route.instance_id) is not route
        return route.draining and taken

    def _check_live(self, route: Route, node: str) -> None:
        if self.router.get(route.instance_id) is route:
            return
        if node in self.down or node not in self.nodes:  # its node went down meanwhile
            raise NodeFailedError(f"node {node} went down while loading", node=node)
        raise InstanceFailedError(  # it failed on its own (its engine thread died)
            f"instance {route.instance_id} on node {node} failed while loading", node=node,
            instance=route.instance_id,
        )  # fmt: skip
