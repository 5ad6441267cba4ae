"""Candidates: the few nodes a placement has to look at, out of thousands.

Startup-time-aware placement takes the node with the smallest estimate (the best
node, full or not) and the best node with room. A node that does not hold the
checkpoint and has an empty loading queue would download it, and its estimate
depends on its calibration alone (registry seconds per byte, build overhead): nodes
of one slot count and one calibration form a group with one estimate. So the
policy decides the same over a shortlist, in the given order, of:

- every node holding the checkpoint (DRAM or disk) and every node with a load queued,
  estimated one by one;
- of the groups with the lowest download estimate, the first node in the given order,
  once among all their nodes and once among those with room for the instance (a
  group's first node is the one a tie goes to);
- likewise among the nodes that lack room but have it once their idle instances
  stop (NodeView.idle: the policy's reclaim option), holders and loading nodes
  included.

When the shortlist's best node is full and runs instances the policy may migrate,
the destinations of those instances need the same treatment for their models:
`place` then adds, for each, its holders and the first node with room of every
group (a migration's value stops falling once the move is shorter than the source's
loading queue, so every group's first node can be the answer). The baselines look at
nodes with room, and when there are none, at the nodes with room once their idle
instances stop: they get exactly those.

Proven for NodeView's fields as they are: a field that gives a node room another way
must be indexed here before shortlisting is trusted with it, and until then `place`
shows the policy every node.

The index is its owner's to keep true: update(status, idle) after a node's status,
its idle instances (`idle`: the slots of those its NodeView offers; one turned idle,
busy, or stopped) or its estimator state changed (a load begun, finished or
cancelled; a calibration).
Nodes are ordered by their first update. tests/cluster/test_candidates.py checks
the decisions against the policy's over every node on random clusters.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ember.cluster.estimator import StartupEstimate, StartupTimeEstimator
from ember.cluster.messages import NodeStatus
from ember.cluster.placement import (
    NodeView,
    Placement,
    PlacementPolicy,
    RandomPlacement,
    RoundRobinPlacement,
    StartupTimeAware,
    has_room,
)

_T = TypeVar("_T", int, tuple[float, int])
_Key = tuple[bool, int, float | None, float | None]  # loading, slots, registry s/byte, overhead s


@dataclass
class _Group:
    """Nodes with one slot count and calibration, all loading or none loading."""

    loading: bool
    slots: int
    calibration: tuple[float | None, float | None]
    # room[k]: (queue end, position) of the members with >= k free slots, sorted; the
    # queue end is 0 for idle members, so they are in the given order
    room: list[list[tuple[float, int]]] = field(default_factory=list)
    # reclaim[k]: likewise, the members with fewer than k free slots that have k once
    # their idle instances stop
    reclaim: list[list[tuple[float, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.room = [[] for _ in range(self.slots + 1)]
        self.reclaim = [[] for _ in range(self.slots + 1)]

    def lists(self, free: int, idle: int) -> Iterable[list[tuple[float, int]]]:
        """The lists a member with `free` free slots and `idle` idle ones' slots is in."""
        yield from self.room[: min(free, self.slots) + 1]
        yield from self.reclaim[free + 1 : min(free + idle, self.slots) + 1]


class Candidates:
    """Which nodes hold which checkpoint, which have room (free, or once their idle
    instances stop), which are loading and until when: the index behind shortlist()
    (see the module doc)."""

    def __init__(self, estimator: StartupTimeEstimator, statuses: Iterable[NodeStatus] = ()) -> None:
        self.estimator = estimator
        self._ids: list[str] = []  # by position (the given order)
        self._pos: dict[str, int] = {}
        self._status: dict[str, NodeStatus] = {}
        self._entry: dict[str, tuple[_Key, float]] = {}  # node -> its group and queue end
        self._groups: dict[_Key, _Group] = {}
        self._holders: dict[str, set[str]] = {}  # checkpoint -> nodes holding it (DRAM or disk)
        self._room: list[list[int]] = [[]]  # room[k]: positions of every node with >= k free
        self._idle: dict[str, int] = {}  # node -> slots its idle instances hold
        self._total: list[list[int]] = [[]]  # total[k]: nodes with >= k free + idle slots
        for status in statuses:
            self.update(status)

    # -- keeping it true --------------------------------------------------------------

    def update(self, status: NodeStatus, idle: int = 0) -> None:
        """`status` is the node's now (and its estimator state may have changed); its
        idle instances (those NodeView.idle offers) hold `idle` slots."""
        node = status.node_id
        old = self._status.get(node)
        # a node holds hundreds of checkpoints and a change touches one: only that one
        before, after = (_held(old) if old is not None else set()), _held(status)
        if old is not None:
            self._unindex(node, before - after)
        if node not in self._pos:
            self._pos[node] = len(self._ids)
            self._ids.append(node)
        self._index(status, idle, after - before)

    def set_idle(self, node: str, idle: int) -> None:
        """Only the slots of `node`'s idle instances changed (an instance turned idle or
        busy; its status and estimator state are as last updated): update() for less."""
        old, status, pos = self._idle[node], self._status[node], self._pos[node]
        if idle == old:
            return
        key, end = self._entry[node]
        group = self._groups[key]
        lo, hi = status.free_slots + min(old, idle) + 1, status.free_slots + max(old, idle)
        while len(self._total) <= hi:
            self._total.append([])
        for k in range(lo, hi + 1):  # the counts of free + idle slots it gains or loses
            if idle > old:
                bisect.insort(self._total[k], pos)
            else:
                _remove(self._total[k], pos)
        for k in range(lo, min(hi, group.slots) + 1):
            if idle > old:
                bisect.insort(group.reclaim[k], (end, pos))
            else:
                _remove(group.reclaim[k], (end, pos))
        self._idle[node] = idle

    def remove(self, node: str) -> None:
        """The node takes no placements any more (it is down)."""
        if node in self._status:
            self._unindex(node, _held(self._status[node]))

    def _index(self, status: NodeStatus, idle: int, gained: set[str]) -> None:
        node, pos = status.node_id, self._pos[status.node_id]
        self._status[node] = status
        self._idle[node] = idle
        for checkpoint in gained:
            self._holders.setdefault(checkpoint, set()).add(node)
        for lists, top in ((self._room, status.free_slots), (self._total, status.free_slots + idle)):
            while len(lists) <= top:
                lists.append([])
            for k in range(top + 1):
                bisect.insort(lists[k], pos)
        loading = self.estimator.loading(node)
        calibration = self.estimator.calibration(node)
        key: _Key = (loading, status.slots, *calibration)
        end = self.estimator.queue_end(node) if loading else 0.0
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(loading, status.slots, calibration)
        for entries in group.lists(status.free_slots, idle):
            bisect.insort(entries, (end, pos))
        self._entry[node] = (key, end)

    def _unindex(self, node: str, lost: set[str]) -> None:
        status, pos, idle = self._status.pop(node), self._pos[node], self._idle.pop(node)
        for checkpoint in lost:
            holders = self._holders[checkpoint]
            holders.discard(node)
            if not holders:
                del self._holders[checkpoint]
        for k in range(status.free_slots + 1):
            _remove(self._room[k], pos)
        for k in range(status.free_slots + idle + 1):
            _remove(self._total[k], pos)
        key, end = self._entry.pop(node)
        group = self._groups[key]
        for entries in group.lists(status.free_slots, idle):
            _remove(entries, (end, pos))
        if not group.room[0]:
            del self._groups[key]

    # -- asking -----------------------------------------------------------------------

    def shortlist(self, checkpoint: str, nbytes: int, slots: int = 1) -> list[str]:
        """The nodes startup-time-aware placement of `checkpoint` needs, in order."""
        holders = self._holders.get(checkpoint, set())
        picked = {self._pos[n] for n in holders}
        statuses = [self._status[n] for n in holders if self._status[n].slots >= slots]
        held = list(zip(statuses, self.estimator.estimate_many(statuses, checkpoint, nbytes), strict=True))
        groups = self._priced(slots, nbytes)
        for room in (0, slots):
            bound = min((e.total_s for s, e in held if s.free_slots >= room), default=math.inf)
            bound = self._best_idle(groups, _Room(room), holders, bound, picked)
            self._near_loading(groups, _Room(room), (checkpoint, holders), nbytes, bound, picked)
        # the best node that has room once its idle instances stop (and not before)
        reclaim = [e.total_s for s, e in held if s.free_slots < slots <= s.free_slots + self._idle[s.node_id]]
        bound = self._best_idle(groups, _Reclaim(slots), holders, min(reclaim, default=math.inf), picked)
        self._near_loading(groups, _Reclaim(slots), (checkpoint, holders), nbytes, bound, picked)
        return [self._ids[p] for p in sorted(picked)]

    def _priced(self, slots: int, nbytes: int) -> list[tuple[_Group, float]]:
        """The groups of nodes with at least `slots` slots, with their download estimate."""
        groups = [g for g in self._groups.values() if g.slots >= slots]
        prices = self.estimator.download_estimates([g.calibration for g in groups], nbytes)
        return list(zip(groups, prices, strict=True))

    def _best_idle(
        self,
        groups: list[tuple[_Group, float]],
        room: _Lists,
        holders: set[str],
        bound: float,
        picked: set[int],
    ) -> float:
        """Pick the first idle node (of those `room` lists) of the idle groups with the
        lowest download estimate; return the bound lowered to it."""
        best: tuple[float, int] | None = None
        for group, download in groups:
            if group.loading or not room(group):
                continue
            first = self._first(room(group), holders)
            if first is not None:
                value = (download, first)
                best = value if best is None or value < best else best
        if best is None:
            return bound
        picked.add(best[1])
        return min(bound, best[0])

    def _near_loading(
        self,
        groups: list[tuple[_Group, float]],
        room: _Lists,
        held: tuple[str, set[str]],
        nbytes: int,
        bound: float,
        picked: set[int],
        floor: float = -math.inf,
    ) -> None:
        """Pick the loading nodes (of those `room` lists) that may estimate at most `bound` (or
        `floor`, if higher):
        a node's estimate is at least its queue end - now + its download estimate, and a
        group's members come by queue end, so each group is read until that passes."""
        checkpoint, holders = held
        now = self.estimator.clock()
        for group, download in groups:
            entries = room(group)
            if not group.loading or not entries:
                continue
            for end, pos in entries:
                node = self._ids[pos]
                if node in holders:
                    continue
                limit = max(bound, floor)
                if end - now + download > limit + 1e-9 * (abs(limit) + abs(now) + 1.0):
                    break  # a margin for rounding: the bound only ever keeps a node
                picked.add(pos)
                estimate = self.estimator.estimate(self._status[node], checkpoint, nbytes).total_s
                bound = min(bound, estimate)

    def destinations(
        self, checkpoint: str, nbytes: int, slots: int, plateau_s: float, source: str, size: int
    ) -> list[str]:
        """Where a migrating instance of `checkpoint` taking `slots` slots may go, as far
        as its estimate tells them apart: its holders, every idle group's first node with
        room, and the loading nodes with room that may estimate lowest or below
        `plateau_s` (a move that short hides behind the source's queue: such
        destinations tie, and the first in order wins). `source`, the node it leaves, is
        no destination, nor a node of fewer than `size` slots (the placement's size:
        the policy looks at no smaller node)."""
        holders = self._holders.get(checkpoint, set())
        picked = {self._pos[n] for n in holders}
        skip = holders | {source}
        statuses = [
            status
            for status in (self._status[n] for n in holders - {source})
            if status.free_slots >= slots and status.slots >= size
        ]
        estimates = self.estimator.estimate_many(statuses, checkpoint, nbytes)
        bound = min((e.total_s for e in estimates), default=math.inf)
        groups = self._priced(max(slots, size), nbytes)
        for group, download in groups:
            if not group.loading and (first := self._first(group.room[slots], skip)) is not None:
                picked.add(first)
                bound = min(bound, download)
        self._near_loading(groups, _Room(slots), (checkpoint, skip), nbytes, bound, picked, floor=plateau_s)
        return [self._ids[p] for p in sorted(picked)]

    def with_room(self, slots: int) -> list[str]:
        """Every node with at least `slots` free slots, in order."""
        return [self._ids[p] for p in self._room[slots]] if slots < len(self._room) else []

    def with_reclaim(self, slots: int) -> list[str]:
        """Every node with at least `slots` free slots once its idle instances stop, in order."""
        return [self._ids[p] for p in self._total[slots]] if slots < len(self._total) else []

    def most_room(self) -> int:
        """The most free slots any node has."""
        return max((k for k, positions in enumerate(self._room) if positions), default=0)

    def __len__(self) -> int:
        return len(self._status)

    def nodes(self) -> list[str]:
        return [n for n in self._ids if n in self._status]

    def in_order(self, nodes: Iterable[str]) -> list[str]:
        """`nodes` in the given order."""
        return sorted(nodes, key=self._pos.__getitem__)

    def _first(self, entries: list[tuple[float, int]], skip: set[str]) -> int | None:
        """The first position whose node is not in `skip` (skipping costs one per holder)."""
        for _, p in entries:
            if self._ids[p] not in skip:
                return p
        return None


@dataclass(frozen=True)
class _Room:
    """A group's members with at least `slots` free slots."""

    slots: int

    def __call__(self, group: _Group) -> list[tuple[float, int]]:
        return group.room[self.slots]


@dataclass(frozen=True)
class _Reclaim:
    """A group's members with fewer than `slots` free slots but that many once their idle
    instances stop."""

    slots: int

    def __call__(self, group: _Group) -> list[tuple[float, int]]:
        return group.reclaim[self.slots]


_Lists = Callable[[_Group], list[tuple[float, int]]]

FEW_NODES = 16  # measured: ember sim at 10 servers ran faster without a shortlist

# the code the shortlist was proven against (tests/cluster/test_candidates.py)
_PROVEN_PLACE = (StartupTimeAware.place, RandomPlacement.place, RoundRobinPlacement.place)
_PROVEN_ESTIMATE = (StartupTimeEstimator.estimate, StartupTimeEstimator._estimate)
# what a NodeView tells a policy; a new field (a new way to make room) is not indexed
# here, so until it is, placement gets every node
_PROVEN_VIEW = ("status", "running", "slot_free_in_s", "idle")


def place(
    policy: PlacementPolicy,
    candidates: Candidates,
    checkpoint: str,
    nbytes: int,
    slots: int,
    view: Callable[[str], NodeView],
    *,
    few: int = FEW_NODES,
) -> Placement | None:
    """policy.place over the nodes it needs (`view` builds a node's NodeView), with
    the decision it would make over every node in the index's order. A cluster of at
    most `few` nodes is shown whole: there, shortlisting costs more than it saves."""
    if len(candidates) <= few or not _understood(policy, candidates):
        return policy.place(checkpoint, nbytes, [view(n) for n in candidates.nodes()], slots)
    if isinstance(policy, RandomPlacement | RoundRobinPlacement):
        # they choose among free nodes, and failing those among nodes with idle instances to stop
        names = candidates.with_room(slots) or candidates.with_reclaim(slots)
        return policy.place(checkpoint, nbytes, [view(n) for n in names], slots)
    assert isinstance(policy, StartupTimeAware)
    names = candidates.shortlist(checkpoint, nbytes, slots)
    views = [view(n) for n in names]
    placement = policy.place(checkpoint, nbytes, views, slots)
    if policy.migration is None:
        return placement
    sources = _full_rivals(policy.estimator, views, placement, checkpoint, nbytes, slots)
    if not sources:
        return placement
    more = set(names)
    for src, est in sources:
        for victim in src.running:
            plateau = est.queue_s - policy.migration.seconds(victim.tokens)
            dests = candidates.destinations(
                victim.model, victim.nbytes, victim.slots, plateau, src.node_id, slots
            )
            more.update(dests)
    known = {v.node_id: v for v in views}
    order = candidates.in_order(more)
    return policy.place(checkpoint, nbytes, [known.get(n) or view(n) for n in order], slots)


def _understood(policy: PlacementPolicy, candidates: Candidates) -> bool:
    """Shortlisting is proven for these policies and this estimator as written here; a
    subclass or a patch that changes either gets every node."""
    estimator = getattr(policy, "estimator", None)
    return (
        tuple(f.name for f in dataclasses.fields(NodeView)) == _PROVEN_VIEW
        and type(policy).place in _PROVEN_PLACE
        and estimator is candidates.estimator
        and (type(estimator).estimate, type(estimator)._estimate) == _PROVEN_ESTIMATE
    )


def _full_rivals(
    estimator: StartupTimeEstimator,
    views: Sequence[NodeView],
    placement: Placement | None,
    checkpoint: str,
    nbytes: int,
    slots: int,
) -> list[tuple[NodeView, StartupEstimate]]:
    """Full nodes running instances that could be the best node and so a migration's
    source, with their estimates: those estimated below the start chosen (any, if none
    was)."""
    full = [v for v in views if v.status.slots >= slots and not has_room(v, slots) and v.running]
    if not full:
        return []
    bound = placement.estimate_s if placement is not None and placement.action == "start" else math.inf
    estimates = estimator.estimate_many([v.status for v in full], checkpoint, nbytes)
    return [(v, e) for v, e in zip(full, estimates, strict=True) if e.total_s < bound]


def _held(status: NodeStatus) -> set[str]:
    return {*status.dram, *status.disk}


def _remove(entries: list[_T], entry: _T) -> None:
    """Take `entry` out of the sorted list `entries`."""
    i = bisect.bisect_left(entries, entry)
    if i < len(entries) and entries[i] == entry:
        del entries[i]
