"""Which idle instances a start may stop: Instances.view() offers an idle instance
only when nothing needs it (its deployment's minimum, requests on their way to it, a
live migration's hand-over), longest idle first."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ember.cluster.config import ControllerConfig
from ember.cluster.estimator import StartupTimeEstimator
from ember.cluster.events import NoEvents
from ember.cluster.instances import Instances
from ember.cluster.migration_cost import MigrationCost
from ember.cluster.placement import make_policy
from ember.cluster.router import Route, Router
from ember.cluster.state import ClusterState, Deployment
from tests.cluster.fakes import FakeClock, status

pytestmark = pytest.mark.timeout(30)


def _instances(tmp_path: Path, deps: dict[str, Deployment], waiting: Counter[str]) -> Instances:
    clock = FakeClock()
    estimator = StartupTimeEstimator(clock=clock)
    return Instances(
        {}, router=Router(clock=clock), state=ClusterState(tmp_path / "cluster.db"), estimator=estimator,
        policy=make_policy("startup-time-aware", estimator), cost=MigrationCost(), events=NoEvents(),
        config=ControllerConfig(), deployment=deps.get, waiting=waiting.__getitem__,
    )  # fmt: skip


def _idle(inst: Instances, instance_id: str, dep: str, node: str, idle_since: float) -> Route:
    route = inst.router.add(instance_id, dep, node)
    inst.router.set_ready(instance_id)
    route.idle_since = idle_since
    return route


def test_only_idle_instances_nothing_needs_are_offered_longest_idle_first(tmp_path: Path) -> None:
    deps = {
        "a": Deployment("a", "m1", min_instances=0),
        "kept": Deployment("kept", "m2", min_instances=1),
        "wanted": Deployment("wanted", "m3", min_instances=0),
        "moving": Deployment("moving", "m4", min_instances=0),
    }
    waiting: Counter[str] = Counter()
    inst = _instances(tmp_path, deps, waiting)
    _idle(inst, "a-new", "a", "n", idle_since=50.0)
    _idle(inst, "a-old", "a", "n", idle_since=10.0)
    _idle(inst, "kept-1", "kept", "n", idle_since=0.0)  # its deployment's minimum of one
    _idle(inst, "wanted-1", "wanted", "n", idle_since=0.0)
    busy = inst.router.add("busy", "a", "n")
    inst.router.set_ready("busy")
    inst.router.begin(busy)
    source = _idle(inst, "moving-src", "moving", "n", idle_since=0.0)
    source.draining = True  # being migrated away: not offered either
    _idle(inst, "moving-dest", "moving", "n", idle_since=0.0)
    inst._sources["moving-dest"] = source  # a live migration's destination, before its hand-over
    waiting["wanted"] = 2  # requests waiting for "wanted": its idle instance is about to serve them

    view = inst.view(status("n", free=0, slots=8))
    assert [i.instance_id for i in view.idle] == ["a-old", "a-new"]
    waiting["wanted"] = 0
    view = inst.view(status("n", free=0, slots=8))
    assert [i.instance_id for i in view.idle] == ["wanted-1", "a-old", "a-new"]


def test_a_deployment_keeps_its_minimum_across_the_nodes_of_one_placement(tmp_path: Path) -> None:
    deps = {"d": Deployment("d", "m", min_instances=1)}
    inst = _instances(tmp_path, deps, Counter())
    _idle(inst, "d-x", "d", "x", idle_since=0.0)
    _idle(inst, "d-y", "d", "y", idle_since=0.0)
    spare: dict[str, int] = {}
    views = [inst.view(status(n, free=0), spare) for n in ("x", "y")]
    assert [len(v.idle) for v in views] == [1, 0]  # one of the two may go, not both
