"""Autoscaler: instances follow requests in flight per instance; idle ones go after keep-alive."""

from __future__ import annotations

import pytest

from ember.cluster.autoscaler import Autoscaler, InstanceLoad, ScalePlan
from ember.cluster.state import Deployment
from tests.cluster.fakes import FakeClock

pytestmark = pytest.mark.timeout(30)
DEP = Deployment("d", "m", min_instances=0, max_instances=3, target_concurrency=4, keep_alive_s=60)


def test_scales_with_in_flight_requests_within_the_bounds() -> None:
    scaler = Autoscaler(FakeClock())
    assert scaler.plan(DEP, [], waiting=0).start == 0
    assert scaler.plan(DEP, [], waiting=1).start == 1  # a cold request starts one
    busy = [InstanceLoad("a", True, 4, None)]
    assert scaler.plan(DEP, busy, waiting=3).start == 1  # 7 in demand, 4 per instance
    assert scaler.plan(DEP, busy, waiting=100).start == 2  # never past max_instances
    floor = Deployment("f", "m", min_instances=2)
    assert scaler.plan(floor, [], waiting=0).start == 2


def test_idle_instances_go_after_keep_alive_down_to_what_is_wanted() -> None:
    clock = FakeClock()
    scaler = Autoscaler(clock)
    idle = [InstanceLoad("old", True, 0, clock.now - 10), InstanceLoad("new", True, 0, clock.now)]
    assert scaler.plan(DEP, idle, waiting=0).stop == ()
    clock.advance(55)
    assert scaler.plan(DEP, idle, waiting=0).stop == ("old",)
    clock.advance(10)
    assert scaler.plan(DEP, idle, waiting=0).stop == ("old", "new")  # down to zero
    keep_one = Deployment("k", "m", min_instances=1, keep_alive_s=60)
    assert scaler.plan(keep_one, idle, waiting=0).stop == ("old",)
    busy = [InstanceLoad("b", True, 1, None)]
    assert scaler.plan(DEP, busy, waiting=0).stop == ()
    assert scaler.expires_in(DEP, busy[0]) == float("inf")


def test_starts_not_placed_yet_count_as_instances_when_starting_more() -> None:
    scaler = Autoscaler(FakeClock())
    busy = [InstanceLoad("a", True, 4, None)]
    assert scaler.plan(DEP, busy, waiting=100, starting=1).start == 1  # 3 wanted: 1 running, 1 placing
    assert scaler.plan(DEP, busy, waiting=100, starting=2) == ScalePlan(0, ())
    assert scaler.plan(DEP, [], waiting=1, starting=1).start == 0  # a second cold request waits for the first
