"""StartupTimeEstimator: q + n / b per node, calibrated by every finished load."""

from __future__ import annotations

import itertools

import pytest

from ember.cluster.estimator import StartupTimeEstimator
from ember.cluster.messages import BandwidthProbe
from tests.cluster.fakes import GB, FakeClock, loaded, status

pytestmark = pytest.mark.timeout(30)


def test_the_fastest_measured_tier_that_holds_the_checkpoint_sets_the_estimate() -> None:
    est = StartupTimeEstimator(clock=FakeClock())
    est.calibrate(BandwidthProbe("a", {"dram": 10 * GB, "disk": 2 * GB, "registry": 0.5 * GB}))
    assert est.estimate(status("a", dram=("m",), disk=("m",)), "m", 4 * GB).tier == "dram"
    assert est.estimate(status("a", disk=("m",)), "m", 4 * GB).tier == "disk"
    assert est.estimate(status("a"), "m", 4 * GB).tier == "registry"
    # A node whose disk was measured faster than its "DRAM" copy: the measurement wins.
    est.calibrate(BandwidthProbe("b", {"dram": 1 * GB, "disk": 3 * GB}))
    e = est.estimate(status("b", dram=("m",), disk=("m",)), "m", 3 * GB)
    assert e.tier == "disk"
    assert e.load_s == pytest.approx(1.0 + est.overhead("b"))


def test_a_throttled_load_corrects_the_estimate_over_the_next_loads() -> None:
    clock = FakeClock()
    est = StartupTimeEstimator(clock=clock)
    est.calibrate(BandwidthProbe("a", {"disk": 2 * GB}))  # the probe saw a fast disk
    n, true_bw = 4 * GB, 0.2 * GB  # loads run at a tenth of it (throttled)
    errors = []
    for _ in range(6):
        e = est.estimate(status("a", disk=("m",)), "m", n)
        token = est.begin(e)
        actual = n / true_bw
        clock.advance(actual)
        obs = est.finish(token, loaded("a", "disk", n, actual))
        assert obs.estimated_s == pytest.approx(e.total_s)
        assert obs.actual_s == pytest.approx(actual)
        errors.append(abs(obs.estimated_s - obs.actual_s) / obs.actual_s)
    assert errors[0] > 0.8  # the first estimate was far off
    assert all(later < earlier for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 0.05
    assert est.bandwidth("a", "disk") == pytest.approx(true_bw, rel=0.05)


def test_the_loading_queue_adds_the_remaining_time_of_each_queued_load() -> None:
    clock = FakeClock()
    est = StartupTimeEstimator(clock=clock)
    est.calibrate(BandwidthProbe("a", {"registry": 1 * GB}))
    first = est.begin(est.estimate(status("a"), "m", 10 * GB))
    second = est.begin(est.estimate(status("a"), "m", 10 * GB))
    load = 10.0 + est.overhead("a")
    assert est.queue_wait("a") == pytest.approx(2 * load)
    clock.advance(4)
    assert est.queue_wait("a") == pytest.approx(2 * load - 4)
    est.cancel(first)  # the second one runs from now
    assert est.queue_wait("a") == pytest.approx(load)
    est.cancel(second)
    assert est.queue_wait("a") == 0


def test_a_small_load_calibrates_the_overhead_but_not_the_bandwidth() -> None:
    """A few-MB copy that took half a second (a busy machine) says nothing about DRAM's
    bandwidth: the node holding the model in DRAM still beats a download elsewhere."""
    clock = FakeClock()
    est = StartupTimeEstimator(clock=clock)
    est.calibrate(BandwidthProbe("a", {"dram": 8 * GB, "registry": 0.1 * GB}))
    est.calibrate(BandwidthProbe("b", {"dram": 8 * GB, "registry": 0.1 * GB}))
    small = 4 << 20
    for _ in range(3):
        token = est.begin(est.estimate(status("a", dram=("m",)), "m", small))
        clock.advance(0.5)
        est.finish(token, loaded("a", "dram", small, 0.5, overhead_s=0.2))
    assert est.bandwidth("a", "dram") == pytest.approx(8 * GB)
    assert est.overhead("a") > 0.1
    in_dram = est.estimate(status("a", dram=("m",)), "m", small)
    download = est.estimate(status("b"), "m", small)
    assert in_dram.total_s < download.total_s
