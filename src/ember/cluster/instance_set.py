"""InstanceSet: the instances a cluster runs, as the control plane sees them.

Each instance is a record in SQLite and a route in the Router; this keeps the
requests each serves (relays), the nodes' health and the stopping of instances. A
node that raises NodeFailedError or whose status() fails or times out is marked
down: nothing is placed there any more, its routes go, its instance records are
dead, and the relays it served are interrupted so they resume elsewhere. An
InstanceFailedError (one instance's engine thread died) does the same to that
instance alone, and stops it so its slot frees. Bringing new instances up (placing,
starting, live-migrating) is `Instances`, built on this.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from ember.cluster.config import ControllerConfig
from ember.cluster.events import ClusterEvents
from ember.cluster.messages import NodeStatus
from ember.cluster.relay import Relay
from ember.cluster.router import Route, Router
from ember.cluster.runtime import NodeRuntime
from ember.cluster.state import ClusterState, Deployment
from ember.errors import ClusterStateError, InstanceFailedError, NodeFailedError

log = logging.getLogger(__name__)


class InstanceSet:
    """The running instances of every deployment: health, relays, stopping (module doc)."""

    def __init__(
        self,
        nodes: dict[str, NodeRuntime],
        *,
        router: Router,
        state: ClusterState,
        events: ClusterEvents,
        config: ControllerConfig,
        deployment: Callable[[str], Deployment | None],
    ) -> None:
        self.nodes = nodes
        self.router = router
        self.state = state
        self.events = events
        self.config = config
        self.deployment = deployment
        self.stopping: set[str] = set()  # instance ids a stop() is under way for
        self.relays: dict[str, set[Relay]] = {}  # instance id -> the requests it serves
        self.down: set[str] = set()
        self.changed = asyncio.Condition()
        self.changes = 0  # notify() calls so far: a waiter sees what it would have missed
        self.tasks: set[asyncio.Task[None]] = set()
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
        the requests it served (they resume elsewhere). An InstanceFailedError takes
        down its instance alone (instance_failed)."""
        if isinstance(error, InstanceFailedError) and error.instance is not None:
            self.instance_failed(error.instance, error)
            return
        if node_id in self.down or node_id not in self.nodes:
            return
        self.down.add(node_id)
        log.error("node %s is down: %s", node_id, error or type(error).__name__)
        failure = error if isinstance(error, NodeFailedError) else NodeFailedError(
            f"node {node_id} stopped answering: {error or type(error).__name__}", node=node_id
        )  # fmt: skip
        for route in self.router.on_node(node_id):
            self._drop(route, failure)
        self.spawn(self.notify())

    def instance_failed(self, instance_id: str, error: NodeFailedError) -> None:
        """An instance that cannot serve (its engine thread died) on a node that lives on:
        its route and record go, the requests it served resume elsewhere, and it is
        stopped on its node, which frees its slot for the replacement."""
        route = self.router.get(instance_id)
        if route is None:  # already dropped
            return
        log.error("instance %s of %s on %s failed: %s", instance_id, route.deployment, route.node, error)
        self._drop(route, error)
        self.spawn(self._discard(route.node, instance_id))

    def _drop(self, route: Route, failure: NodeFailedError) -> None:
        self.record_dead(route.instance_id)
        self.router.remove(route.instance_id)
        source = self._sources.pop(route.instance_id, None)
        if source is not None:  # a migration's destination died: its source serves on
            source.draining = False
        for relay in list(self.relays.get(route.instance_id, ())):
            relay.interrupt(failure)

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

    # -- stopping ---------------------------------------------------------------------

    async def stop(self, route: Route) -> None:
        """Stop an instance once its requests are done, and forget it. Its record says
        dead first: if that write fails (ClusterStateError) the instance stays, in the
        database and here, as it was: serving again (the autoscaler stops it when it is
        next idle past keep-alive) or, its deployment deleted, draining until
        stop_orphans() tries again. A second stop() of the same instance does nothing."""
        if route.instance_id in self.stopping:
            return
        self.stopping.add(route.instance_id)
        recorded = False
        try:
            async with self.changed:
                await self.changed.wait_for(lambda: route.in_flight == 0)
            self.state.set_instance_state(route.instance_id, "dead")
            recorded = True
            if route.node not in self.down and route.node in self.nodes:
                await self.nodes[route.node].stop_instance(route.instance_id)
            self.events.scaled(route.deployment, "down")
            log.info("instance %s of %s stopped", route.instance_id, route.deployment)
        except ClusterStateError as exc:
            log.error("instance %s of %s stays up: %s", route.instance_id, route.deployment, exc)
            if self.deployment(route.deployment) is not None:
                route.draining = False
        except NodeFailedError as exc:
            self.mark_down(exc.node or route.node, exc)
        except Exception:
            log.exception("stopping instance %s failed", route.instance_id)
        finally:
            self.stopping.discard(route.instance_id)
            if recorded:
                self.router.remove(route.instance_id)
            await self.notify()

    def stop_orphans(self) -> None:
        """Stop the ready instances of deleted deployments that no stop() is stopping
        (one whose record could not be written)."""
        for route in self.router.routes():
            if (
                route.ready
                and route.instance_id not in self.stopping
                and self.deployment(route.deployment) is None
            ):
                self.router.drain(route.instance_id)
                self.spawn(self.stop(route))

    def record_dead(self, instance_id: str) -> None:
        """Mark an instance that is gone dead in the database, if the database lets us:
        it is gone either way (and every live record is marked dead on the next open)."""
        try:
            self.state.set_instance_state(instance_id, "dead")
        except ClusterStateError as exc:
            log.error("instance %s is gone but its record says otherwise: %s", instance_id, exc)

    # -- helpers ----------------------------------------------------------------------

    async def _discard(self, node_id: str | None, instance_id: str) -> None:
        """Stop an instance that started but cannot serve (its load failed, its engine
        died); a start waiting for its slot hears of it."""
        if node_id is None or node_id in self.down:
            return
        try:
            await self.nodes[node_id].stop_instance(instance_id)
        except Exception as exc:
            log.warning("stopping failed instance %s on %s: %s", instance_id, node_id, exc)
        await self.notify()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def notify(self) -> None:
        async with self.changed:
            self.changes += 1
            self.changed.notify_all()
