"""Placement: which node starts a new instance.

`StartupTimeAware` (ServerlessLLM) starts it on the node with the smallest
estimated start-up time among nodes with a free slot. When the node with the
smallest estimate overall is full, it compares three ways of using that node or
not: start on the best free node instead; wait for a slot there (a draining instance
going, or a running one going idle at its requests' pace so far); or live-migrate
one of its running inferences to a free node (a * tokens + b, plus the
destination's own start-up) and start there. Migration is only considered when a
migrator exists (`migration` is given).

The baselines (random, round robin, remote-only: every start downloads from the
registry, as a serving system without a local cache does) place among free nodes.
All are plain objects over `NodeView`s, testable without a model.

An idle instance (no request in flight, not needed for the deployment's minimum)
keeps its slot only while nobody else needs it: keep-alive saves its model's next
start, but a start that finds no free slot takes an idle instance's slot at once
rather than wait out its keep-alive (`Placement.reclaim`: the instances to stop
first, longest idle first; their weights stay in the node's DRAM pool). Every
policy reclaims, and only where no node has a free slot it would use instead:
random and round robin when no node is free, startup-time-aware when reclaiming
gives the fastest start and, if a node is free, loads from a faster tier than the
free node would (the idle instance is lost for good, while two estimates of one tier
differ mostly by noise: in an 8-node run with 1 Gb/s to the registry, the nodes'
learnt registry bandwidths ranged 57-115 MB/s over one shared link, and by them
startup-time-aware stopped idle instances on two nodes while five sat empty).

An instance takes `slots` slots of one node (a model larger than one GPU takes
several, as tensor parallelism will): a node has room when its free_slots are at
least that many. Ties go to the node first in the given order (deterministic for a
deterministic input); the random baseline draws from an injectable generator.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from ember.cluster.estimator import StartupEstimate, StartupTimeEstimator
from ember.cluster.messages import TIERS, LoadTier, NodeStatus
from ember.cluster.migration_cost import MigrationCost
from ember.errors import InvalidRequestError

POLICIES = ("startup-time-aware", "random", "round-robin", "remote-only")


@dataclass(frozen=True)
class RunningInstance:
    """An instance placement might move away: its model and its largest inference."""

    instance_id: str
    model: str
    nbytes: int
    tokens: int  # prompt + output so far of its longest in-flight request
    slots: int = 1  # slots it holds on its node (and needs on a destination)
    # seconds until it has nothing in flight, if its requests run to their max_tokens at
    # the pace they have streamed so far (inf: not known yet, e.g. still in prefill)
    idle_in_s: float = math.inf


@dataclass(frozen=True)
class IdleInstance:
    """An instance with nothing in flight that a start may stop to take its slots."""

    instance_id: str
    slots: int = 1


@dataclass(frozen=True)
class NodeView:
    """What placement knows of a node: its status, the instances it runs, the idle ones
    a start may stop (longest idle first), and when a slot is expected to free up there
    otherwise (a draining instance finishing, a kept instance's keep-alive ending)."""

    status: NodeStatus
    running: tuple[RunningInstance, ...] = ()
    slot_free_in_s: float = math.inf
    idle: tuple[IdleInstance, ...] = ()

    @property
    def node_id(self) -> str:
        return self.status.node_id


@dataclass(frozen=True)
class Placement:
    """start: load on `node` now. wait: a slot on `node` frees in `wait_s`, then load.
    migrate: move `migrate_instance` to `migrate_to`, then load on `node`.
    `cold`: the node must load from the registry (remote-only baseline)."""

    action: Literal["start", "wait", "migrate"]
    node: str
    tier: LoadTier
    estimate_s: float  # expected seconds until the new instance is ready
    estimate: StartupEstimate
    wait_s: float = 0.0
    migrate_instance: str | None = None
    migrate_to: str | None = None
    cold: bool = False
    reclaim: tuple[str, ...] = ()  # idle instances on `node` to stop first, for their slots


class PlacementPolicy(Protocol):
    name: str

    def place(
        self, checkpoint: str, nbytes: int, nodes: Sequence[NodeView], slots: int = 1
    ) -> Placement | None:
        """Where to start an instance of `checkpoint` taking `slots` slots of one node;
        None if no node can take it now."""
        ...


def has_room(node: NodeView, slots: int) -> bool:
    return node.status.free_slots >= slots


def reclaimable(node: NodeView, slots: int) -> tuple[str, ...] | None:
    """The idle instances to stop, longest idle first, so that `node` has `slots` free:
    () if it has them already, None if stopping every idle one would not do."""
    free, victims = node.status.free_slots, []
    for inst in node.idle:
        if free >= slots:
            break
        victims.append(inst.instance_id)
        free += inst.slots
    return tuple(victims) if free >= slots else None


def with_room(nodes: Sequence[NodeView], slots: int) -> list[tuple[NodeView, tuple[str, ...]]]:
    """The nodes a baseline places on, each with the idle instances to stop there: the
    nodes with free slots; failing those, the nodes where stopping idle ones frees enough."""
    free: list[tuple[NodeView, tuple[str, ...]]] = [(n, ()) for n in nodes if has_room(n, slots)]
    if free:
        return free
    return [(n, r) for n in nodes if (r := reclaimable(n, slots)) is not None]


def _faster_tier(a: Placement, b: Placement) -> bool:
    """Whether `a` loads from a faster tier than `b` (DRAM, then disk, then registry)."""
    return TIERS.index(a.tier) < TIERS.index(b.tier)


def _start(est: StartupEstimate, *, cold: bool = False, reclaim: tuple[str, ...] = ()) -> Placement:
    return Placement("start", est.node, est.tier, est.total_s, est, cold=cold, reclaim=reclaim)


def _slot_free_in(node: NodeView, slots: int) -> float:
    """Seconds until `node` should have `slots` for a start: a draining instance gone,
    or a running one gone idle (a start may then stop it)."""
    idle_in = (r.idle_in_s for r in node.running if node.status.free_slots + r.slots >= slots)
    return min(node.slot_free_in_s, min(idle_in, default=math.inf))


class StartupTimeAware:
    name = "startup-time-aware"

    def __init__(self, estimator: StartupTimeEstimator, migration: MigrationCost | None = None) -> None:
        self.estimator = estimator
        self.migration = migration  # None: no migrator, never migrate

    def place(
        self, checkpoint: str, nbytes: int, nodes: Sequence[NodeView], slots: int = 1
    ) -> Placement | None:
        nodes = [n for n in nodes if n.status.slots >= slots]  # the others can never hold it
        if not nodes:
            return None
        estimates = self.estimator.estimate_many([n.status for n in nodes], checkpoint, nbytes)
        ests = {n.node_id: e for n, e in zip(nodes, estimates, strict=True)}
        best = min(nodes, key=lambda n: ests[n.node_id].total_s)
        best_est = ests[best.node_id]
        if has_room(best, slots):
            return _start(best_est)
        free = [n for n in nodes if has_room(n, slots)]
        options: list[Placement] = []
        if free:
            options.append(_start(ests[min(free, key=lambda n: ests[n.node_id].total_s).node_id]))
        reclaims = [(n, r) for n in nodes if not has_room(n, slots) and (r := reclaimable(n, slots))]
        if reclaims:  # after the free start: a tie keeps the idle instance
            node, victims = min(reclaims, key=lambda nr: ests[nr[0].node_id].total_s)
            reclaim = _start(ests[node.node_id], reclaim=victims)
            if not options or _faster_tier(reclaim, options[0]):
                options.append(reclaim)
        if math.isfinite(free_in := _slot_free_in(best, slots)):
            wait = max(free_in, best_est.queue_s)
            options.append(
                Placement("wait", best.node_id, best_est.tier, wait + best_est.load_s, best_est, wait_s=wait)
            )
        if self.migration is not None:
            options += self._migrations(best, best_est, [n for n in nodes if n is not best], slots)
        return min(options, key=lambda p: p.estimate_s, default=None)

    def _migrations(
        self, src: NodeView, src_est: StartupEstimate, others: list[NodeView], slots: int
    ) -> list[Placement]:
        """Moving one running instance off `src` to a node with room for it, where that
        frees enough slots on `src` for the new instance."""
        assert self.migration is not None
        out = []
        for victim in src.running:
            if src.status.free_slots + victim.slots < slots:
                continue
            for dest in others:
                if not has_room(dest, victim.slots):
                    continue
                dest_est = self.estimator.estimate(dest.status, victim.model, victim.nbytes)
                move = dest_est.total_s + self.migration.seconds(victim.tokens)
                wait = max(move, src_est.queue_s)
                placement = Placement(
                    "migrate", src.node_id, src_est.tier, wait + src_est.load_s, src_est,
                    wait_s=wait, migrate_instance=victim.instance_id, migrate_to=dest.node_id,
                )  # fmt: skip
                out.append(placement)
        return out


class RandomPlacement:
    name = "random"

    def __init__(self, estimator: StartupTimeEstimator, rng: random.Random | None = None) -> None:
        self.estimator = estimator
        self.rng = rng or random.Random()

    def place(
        self, checkpoint: str, nbytes: int, nodes: Sequence[NodeView], slots: int = 1
    ) -> Placement | None:
        room = with_room(nodes, slots)
        if not room:
            return None
        node, victims = self.rng.choice(room)
        return _start(self.estimator.estimate(node.status, checkpoint, nbytes), reclaim=victims)


class RoundRobinPlacement:
    name = "round-robin"

    def __init__(self, estimator: StartupTimeEstimator, *, cold: bool = False) -> None:
        self.estimator = estimator
        self.cold = cold
        self._turn = itertools.count()

    def place(
        self, checkpoint: str, nbytes: int, nodes: Sequence[NodeView], slots: int = 1
    ) -> Placement | None:
        room = sorted(with_room(nodes, slots), key=lambda nr: nr[0].node_id)
        if not room:
            return None
        node, victims = room[next(self._turn) % len(room)]
        status = node.status
        if self.cold:  # as if the node held nothing: the estimate of a download
            status = NodeStatus(status.node_id, status.slots, status.free_slots)
        return _start(self.estimator.estimate(status, checkpoint, nbytes), cold=self.cold, reclaim=victims)


class RemoteOnlyPlacement(RoundRobinPlacement):
    """Every start downloads from the registry (no DRAM or disk cache is used)."""

    name = "remote-only"

    def __init__(self, estimator: StartupTimeEstimator) -> None:
        super().__init__(estimator, cold=True)


def make_policy(
    name: str,
    estimator: StartupTimeEstimator,
    *,
    migration: MigrationCost | None = None,
    rng: random.Random | None = None,
) -> PlacementPolicy:
    """A placement policy by name (see POLICIES); `rng` draws the random baseline's
    nodes (default: an unseeded generator; seed one for a reproducible run)."""
    if name == "startup-time-aware":
        return StartupTimeAware(estimator, migration)
    if name == "random":
        return RandomPlacement(estimator, rng)
    if name == "round-robin":
        return RoundRobinPlacement(estimator)
    if name == "remote-only":
        return RemoteOnlyPlacement(estimator)
    raise InvalidRequestError(f"unknown placement policy {name!r} (one of {', '.join(POLICIES)})")
