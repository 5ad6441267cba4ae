"""Autoscaler: how many instances a deployment needs, and which idle ones may go.

Instances scale with the requests in flight (and waiting) per instance: the
deployment wants ceil(demand / target_concurrency) instances, within
[min_instances, max_instances], and at least one while any request waits. An
instance idle for keep_alive_s goes, down to the number wanted (zero allowed).
A plain object over an injectable clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ember.cluster.state import Deployment


@dataclass(frozen=True)
class InstanceLoad:
    """A live instance as the autoscaler sees it."""

    instance_id: str
    ready: bool  # False while loading
    in_flight: int
    idle_since: float | None  # clock time its last request ended; None while busy or loading


@dataclass(frozen=True)
class ScalePlan:
    start: int  # instances to start
    stop: tuple[str, ...]  # idle instances to stop


class Autoscaler:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock

    def wanted(self, dep: Deployment, in_flight: int, waiting: int) -> int:
        """Instances the deployment needs for this demand."""
        demand = in_flight + waiting
        n = math.ceil(demand / dep.target_concurrency)
        if waiting > 0:
            n = max(n, 1)
        return min(dep.max_instances, max(dep.min_instances, n))

    def plan(
        self, dep: Deployment, instances: Sequence[InstanceLoad], waiting: int, starting: int = 0
    ) -> ScalePlan:
        """Start what is missing (`starting`: starts not placed yet, which count as
        instances here); stop idle instances past keep-alive beyond what is wanted."""
        wanted = self.wanted(dep, sum(i.in_flight for i in instances), waiting)
        if wanted > len(instances) + starting:
            return ScalePlan(wanted - len(instances) - starting, ())
        if wanted > len(instances):
            return ScalePlan(0, ())
        now = self.clock()
        expired = sorted(
            (i for i in instances if self.expires_in(dep, i, now) <= 0),
            key=lambda i: i.idle_since or 0.0,
        )
        surplus = len(instances) - wanted
        return ScalePlan(0, tuple(i.instance_id for i in expired[:surplus]))

    def expires_in(self, dep: Deployment, inst: InstanceLoad, now: float | None = None) -> float:
        """Seconds until an idle instance's keep-alive ends (inf while it is busy)."""
        if not inst.ready or inst.in_flight > 0 or inst.idle_since is None:
            return math.inf
        now = self.clock() if now is None else now
        return inst.idle_since + dep.keep_alive_s - now
