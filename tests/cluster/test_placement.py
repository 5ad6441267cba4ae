"""Placement follows the start-up estimate, not a fixed ranking of tiers."""

from __future__ import annotations

import math
import random

import pytest

from ember.cluster.estimator import StartupTimeEstimator
from ember.cluster.messages import BandwidthProbe
from ember.cluster.migration_cost import MigrationCost
from ember.cluster.placement import (
    IdleInstance,
    NodeView,
    RandomPlacement,
    RemoteOnlyPlacement,
    RoundRobinPlacement,
    RunningInstance,
    StartupTimeAware,
    reclaimable,
)
from ember.cluster.relay import Pace
from tests.cluster.fakes import GB, FakeClock, status

pytestmark = pytest.mark.timeout(30)
N = 4 * GB


def _estimator(clock: FakeClock) -> StartupTimeEstimator:
    est = StartupTimeEstimator(clock=clock)
    for node in ("a", "b", "c"):
        est.calibrate(BandwidthProbe(node, {"dram": 8 * GB, "disk": 1 * GB, "registry": 0.1 * GB}))
    return est


def test_dram_wins_when_idle_and_loses_behind_a_long_loading_queue() -> None:
    clock = FakeClock()
    est = _estimator(clock)
    policy = StartupTimeAware(est)
    nodes = [NodeView(status("a", dram=("m",))), NodeView(status("b", disk=("m",)))]
    p = policy.place("m", N, nodes)
    assert p is not None and (p.action, p.node, p.tier) == ("start", "a", "dram")
    # Node a is loading other models (each ~4 s from disk): its queue outweighs its DRAM copy.
    tokens = [est.begin(est.estimate(status("a", disk=("other",)), "other", N)) for _ in range(2)]
    p = policy.place("m", N, nodes)
    assert p is not None and (p.action, p.node, p.tier) == ("start", "b", "disk")
    clock.advance(8.1)
    for token in tokens:  # those loads are done: a wins again
        est.cancel(token)
    p = policy.place("m", N, nodes)
    assert p is not None and p.node == "a"


def test_when_the_best_node_is_full_it_compares_a_free_node_with_waiting() -> None:
    est = _estimator(FakeClock())
    policy = StartupTimeAware(est)
    full = status("a", free=0, dram=("m",))
    free = NodeView(status("b"))  # a download: ~40 s
    soon = policy.place("m", N, [NodeView(full, slot_free_in_s=2.0), free])
    assert soon is not None and (soon.action, soon.node, soon.wait_s) == ("wait", "a", 2.0)
    late = policy.place("m", N, [NodeView(full, slot_free_in_s=100.0), free])
    assert late is not None and (late.action, late.node) == ("start", "b")
    never = policy.place("m", N, [NodeView(full), NodeView(status("c", free=0))])
    assert never is None


def test_migration_is_chosen_only_with_a_migrator_and_when_cheaper() -> None:
    est = _estimator(FakeClock())
    full = NodeView(
        status("a", free=0, dram=("m",)),
        running=(RunningInstance("busy", "small", GB // 100, tokens=500),),
    )
    dest = NodeView(status("b", dram=("small",)))  # the running model is cheap to start there
    assert StartupTimeAware(est).place("m", N, [full, dest]).action == "start"  # type: ignore[union-attr]
    p = StartupTimeAware(est, MigrationCost(a=1e-3, b=0.1)).place("m", N, [full, dest])
    assert p is not None and (p.action, p.node) == ("migrate", "a")
    assert (p.migrate_instance, p.migrate_to) == ("busy", "b")
    slow = StartupTimeAware(est, MigrationCost(a=1.0, b=0.1)).place("m", N, [full, dest])  # 500 s to move
    assert slow is not None and (slow.action, slow.node) == ("start", "b")


def test_migration_cost_is_fitted_from_measured_recomputations() -> None:
    cost = MigrationCost()
    for tokens in (100, 200, 400, 800):
        cost.observe(tokens, 0.002 * tokens + 0.5)
    assert cost.seconds(1000) == pytest.approx(2.5)


def test_baselines_ignore_the_estimate() -> None:
    est = _estimator(FakeClock())
    nodes = [NodeView(status("a", dram=("m",))), NodeView(status("b")), NodeView(status("c", free=0))]
    rr = RoundRobinPlacement(est)
    assert [rr.place("m", N, nodes).node for _ in range(4)] == ["a", "b", "a", "b"]  # type: ignore[union-attr]
    remote = RemoteOnlyPlacement(est).place("m", N, nodes)
    assert remote is not None and remote.cold and remote.tier == "registry"
    picks = {RandomPlacement(est, random.Random(i)).place("m", N, nodes).node for i in range(20)}  # type: ignore[union-attr]
    assert picks == {"a", "b"}


def test_an_instance_of_several_slots_needs_that_many_free_on_one_node() -> None:
    est = _estimator(FakeClock())
    hot = NodeView(status("a", free=1, slots=2, dram=("m",)))  # holds the model, 1 of 2 slots free
    cold = NodeView(status("b", free=2, slots=2))
    for policy in (StartupTimeAware(est), RandomPlacement(est, random.Random(0)), RoundRobinPlacement(est)):
        assert policy.place("m", N, [hot, cold], slots=2).node == "b"  # type: ignore[union-attr]
        assert policy.place("m", N, [hot], slots=2) is None
    assert StartupTimeAware(est).place("m", N, [hot, cold]).node == "a"  # type: ignore[union-attr]


def test_migration_frees_the_slots_the_new_instance_needs() -> None:
    est = _estimator(FakeClock())
    busy = RunningInstance("busy", "small", GB // 100, tokens=10, slots=1)
    src = NodeView(status("a", free=0, dram=("m",)), running=(busy,))
    dest = NodeView(status("b", free=1))
    cost = MigrationCost(a=1e-4, b=0.01)
    assert StartupTimeAware(est, cost).place("m", N, [src, dest], slots=1).action == "migrate"  # type: ignore[union-attr]
    # Moving the one-slot instance would leave `a` one slot short of the two the model needs.
    big = NodeView(status("a", free=0, slots=2, dram=("m",)), running=(busy,))
    assert (
        StartupTimeAware(est, cost).place("m", N, [big, NodeView(status("b", free=1, slots=2))], slots=2)
        is None
    )


def test_a_start_takes_an_idle_instances_slot_rather_than_wait_out_its_keep_alive() -> None:
    est = _estimator(FakeClock())
    # a holds the model in DRAM, but its one slot is held by an idle instance (keep-alive
    # ending in 100 s); b is free but would download (~40 s).
    held = NodeView(status("a", free=0, dram=("m",)), slot_free_in_s=100.0, idle=(IdleInstance("old"),))
    p = StartupTimeAware(est).place("m", N, [held, NodeView(status("b"))])
    assert p is not None and (p.action, p.node, p.tier, p.reclaim) == ("start", "a", "dram", ("old",))
    # Where a free node starts as fast, the idle instance is kept.
    p = StartupTimeAware(est).place("m", N, [held, NodeView(status("b", dram=("m",)))])
    assert p is not None and (p.node, p.reclaim) == ("b", ())


def test_an_idle_instance_is_stopped_for_a_faster_tier_not_for_a_faster_estimate_of_one_tier() -> None:
    est = StartupTimeEstimator(clock=FakeClock())
    est.calibrate(BandwidthProbe("a", {"dram": 8 * GB, "disk": 1 * GB, "registry": 0.12 * GB}))
    est.calibrate(BandwidthProbe("b", {"dram": 8 * GB, "disk": 0.5 * GB, "registry": 0.1 * GB}))
    held = NodeView(status("a", free=0), idle=(IdleInstance("old"),))
    # Both would download; a's registry estimate is lower (in a real run, mostly noise:
    # one link), but the free node costs nothing while stopping the idle instance loses it.
    p = StartupTimeAware(est).place("m", N, [held, NodeView(status("b"))])
    assert p is not None and (p.node, p.tier, p.reclaim) == ("b", "registry", ())
    held_disk = NodeView(status("a", free=0, disk=("m",)), idle=(IdleInstance("old"),))
    p = StartupTimeAware(est).place("m", N, [held_disk, NodeView(status("b", disk=("m",)))])
    assert p is not None and (p.node, p.tier, p.reclaim) == ("b", "disk", ())
    # A faster tier is worth the idle instance: its disk copy against b's download.
    p = StartupTimeAware(est).place("m", N, [held_disk, NodeView(status("b"))])
    assert p is not None and (p.node, p.tier, p.reclaim) == ("a", "disk", ("old",))


def test_baselines_reclaim_idle_slots_only_when_no_node_is_free() -> None:
    est = _estimator(FakeClock())
    idle_a = NodeView(status("a", free=0), idle=(IdleInstance("x"),))
    busy_b = NodeView(status("b", free=0))
    free_c = NodeView(status("c"))
    baselines = (RandomPlacement(est, random.Random(0)), RoundRobinPlacement(est), RemoteOnlyPlacement(est))
    for policy in baselines:
        p = policy.place("m", N, [idle_a, busy_b, free_c])
        assert p is not None and (p.node, p.reclaim) == ("c", ())
        p = policy.place("m", N, [idle_a, busy_b])
        assert p is not None and (p.action, p.node, p.reclaim) == ("start", "a", ("x",))
        assert policy.place("m", N, [busy_b]) is None


def test_reclaiming_stops_the_longest_idle_first_and_only_as_many_as_needed() -> None:
    idle = (IdleInstance("oldest", 1), IdleInstance("older", 2), IdleInstance("newest", 1))
    node = NodeView(status("a", free=1, slots=5), idle=idle)
    assert reclaimable(node, 1) == ()
    assert reclaimable(node, 2) == ("oldest",)
    assert reclaimable(node, 3) == ("oldest", "older")
    assert reclaimable(node, 5) == ("oldest", "older", "newest")
    assert reclaimable(node, 6) is None
    est = _estimator(FakeClock())
    p = StartupTimeAware(est).place("m", N, [node], slots=4)
    assert p is not None and p.reclaim == ("oldest", "older")


def test_a_running_instance_going_idle_soon_is_waited_for_rather_than_a_slow_download() -> None:
    est = _estimator(FakeClock())
    policy = StartupTimeAware(est)
    free = NodeView(status("b"))  # a download: ~40 s

    def held(idle_in_s: float) -> NodeView:
        busy = RunningInstance("busy", "other", GB, tokens=50, idle_in_s=idle_in_s)
        return NodeView(status("a", free=0, dram=("m",)), running=(busy,))

    soon = policy.place("m", N, [held(3.0), free])  # its requests end in 3 s, then a DRAM start
    assert soon is not None and (soon.action, soon.node, soon.wait_s) == ("wait", "a", 3.0)
    for late in (60.0, math.inf):  # ends after the download would, or its pace is not known yet
        p = policy.place("m", N, [held(late), free])
        assert p is not None and (p.action, p.node) == ("start", "b")


def test_a_pace_is_known_from_two_deltas_and_counts_down_from_the_latest() -> None:
    pace = Pace()
    assert pace.seconds_for(10, now=0.0) == math.inf
    pace.delivered(1, now=5.0)  # the first token (after the prefill: not the pace)
    assert pace.seconds_for(10, now=5.0) == math.inf
    pace.delivered(5, now=7.0)  # 4 tokens in 2 s
    assert pace.seconds_for(10, now=7.0) == pytest.approx(5.0)
    assert pace.seconds_for(10, now=8.5) == pytest.approx(3.5)
    assert pace.seconds_for(10, now=9.1) == math.inf  # silent for over 4 tokens' time: stalled
    pace.delivered(6, now=9.2)  # going again, slower: 5 tokens in 4.2 s
    assert pace.seconds_for(10, now=9.2) == pytest.approx(8.4)
