"""Router: the routing table of live instances, and which one takes a request.

A request goes to the ready instance of its deployment with the fewest requests in
flight (a loading or draining instance takes none). The router counts in-flight
requests per instance and when each went idle, for the autoscaler.

Routes are indexed by deployment and by node, so a request costs the routes of its
own deployment, not every route of the cluster (`ember sim` runs thousands of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ember.cluster.autoscaler import InstanceLoad


@dataclass
class Route:
    instance_id: str
    deployment: str
    node: str  # a route exists only once placement chose its node
    ready: bool = False
    draining: bool = False
    in_flight: int = 0
    idle_since: float | None = None
    max_tokens_in_flight: int = 0  # largest prompt + max output in flight (a migration's size)


class Router:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._routes: dict[str, Route] = {}
        self._by_deployment: dict[str, dict[str, Route]] = {}  # insertion order, as _routes
        self._by_node: dict[str, dict[str, Route]] = {}

    def add(self, instance_id: str, deployment: str, node: str) -> Route:
        """A new instance (loading) of `deployment` on `node`."""
        self.remove(instance_id)
        route = Route(instance_id, deployment, node)
        self._routes[instance_id] = route
        self._by_deployment.setdefault(deployment, {})[instance_id] = route
        self._by_node.setdefault(node, {})[instance_id] = route
        return route

    def get(self, instance_id: str) -> Route | None:
        return self._routes.get(instance_id)

    def set_ready(self, instance_id: str) -> None:
        route = self._routes[instance_id]
        if not route.ready:  # ready again once its streamed weights are all in: idle as it was
            route.idle_since = self.clock()
        route.ready = True

    def drain(self, instance_id: str) -> None:
        """Take no new requests; the ones in flight go on."""
        if (route := self._routes.get(instance_id)) is not None:
            route.draining = True

    def remove(self, instance_id: str) -> None:
        route = self._routes.pop(instance_id, None)
        if route is not None:
            _discard(self._by_deployment, route.deployment, instance_id)
            _discard(self._by_node, route.node, instance_id)

    def routes(self, deployment: str | None = None) -> list[Route]:
        if deployment is None:
            return list(self._routes.values())
        return list(self._by_deployment.get(deployment, {}).values())

    def on_node(self, node: str) -> list[Route]:
        return list(self._by_node.get(node, {}).values())

    def pick(self, deployment: str) -> Route | None:
        """The ready, not draining instance with the fewest requests in flight."""
        ready = [r for r in self.routes(deployment) if r.ready and not r.draining]
        return min(ready, key=lambda r: (r.in_flight, r.instance_id), default=None)

    def begin(self, route: Route, tokens: int = 0) -> None:
        """One more request in flight on `route` (`tokens`: its prompt + max output)."""
        route.in_flight += 1
        route.idle_since = None
        route.max_tokens_in_flight = max(route.max_tokens_in_flight, tokens)

    def end(self, route: Route) -> None:
        """A request left `route` (finished, or moved to another instance)."""
        route.in_flight -= 1
        if route.in_flight == 0:
            route.idle_since = self.clock()
            route.max_tokens_in_flight = 0

    def loads(self, deployment: str) -> list[InstanceLoad]:
        """The deployment's live instances that count towards its size (not draining)."""
        return [
            InstanceLoad(r.instance_id, r.ready, r.in_flight, r.idle_since)
            for r in self.routes(deployment)
            if not r.draining
        ]


def _discard(index: dict[str, dict[str, Route]], key: str, instance_id: str) -> None:
    routes = index.get(key)
    if routes is not None:
        routes.pop(instance_id, None)
        if not routes:
            del index[key]
