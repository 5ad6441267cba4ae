"""Benchmark statistics, the --policies vocabulary and the SLO rate of `ember bench sched`."""

from __future__ import annotations

import pytest

from ember.bench.sched_cases import (
    CaseResult,
    PolicySpec,
    RequestTiming,
    median_result,
    parse_policies,
    parse_policy,
    percentile,
    summarise,
)
from ember.bench.sched_curve import max_rate_within
from ember.engine.options import DEFAULT_SCHEDULER
from ember.errors import InvalidRequestError


def test_percentiles_interpolate_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0


def test_request_timings() -> None:
    t = RequestTiming(arrival_s=1.0, first_token_s=1.5, finish_s=3.5, output_tokens=5)
    assert (t.jct, t.ttft, t.tpot) == (2.5, 0.5, 0.5)
    assert RequestTiming(0.0, 1.0, 1.0, 1).tpot is None


def test_policy_names_default_and_a_token_budget() -> None:
    assert parse_policy("fcfs") == PolicySpec("fcfs", "fcfs", None)
    assert parse_policy("default") == PolicySpec("default", DEFAULT_SCHEDULER, None)
    assert parse_policy(" fcfs@512 ") == PolicySpec("fcfs@512", "fcfs", 512)
    assert parse_policy("default@0256") == PolicySpec("default@256", DEFAULT_SCHEDULER, 256)
    assert [p.label for p in parse_policies("fcfs, mlfq,fcfs@512,")] == ["fcfs", "mlfq", "fcfs@512"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lifo", "unknown policy 'lifo'"),
        ("fcfs@", "positive integer"),
        ("fcfs@0", "positive integer"),
        ("fcfs@-5", "positive integer"),
        ("fcfs@1.5", "positive integer"),
        ("fcfs@big", "positive integer"),
        ("lifo@512", "unknown policy"),
        (",", "at least one"),
        ("fcfs,mlfq,fcfs", "fcfs twice"),
        ("fcfs@512,fcfs@0512", "fcfs@512 twice"),
    ],
)
def test_bad_policies_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_policies(text)


def test_a_case_reports_its_iteration_time_distribution() -> None:
    timings = [RequestTiming(0.0, 0.5, 2.0, 4), RequestTiming(1.0, 1.2, 3.0, 1)]
    iters = [0.01 * i for i in range(1, 101)]  # 10 ms .. 1 s
    r = summarise(CaseResult(timings, iters, {"preemptions": 3, "swaps_out": 1}, makespan_s=3.0))
    assert r.iterations == 100
    assert r.p50_iteration_s == pytest.approx(0.505)
    assert r.p90_iteration_s == pytest.approx(0.901)
    assert r.p99_iteration_s == pytest.approx(0.9901)
    assert (r.preemptions, r.swaps_out, r.swaps_in, r.recomputations) == (3, 1, 0, 0)
    assert r.mean_jct_s == pytest.approx(2.0) and r.throughput_tok_s == pytest.approx(5 / 3)
    assert {"p50_iteration_s", "p90_iteration_s", "p99_iteration_s"} <= set(r.to_json())


def test_repeats_report_medians_and_keep_the_spread() -> None:
    def run(jct: float, preemptions: int) -> CaseResult:
        return CaseResult([RequestTiming(0.0, 0.1, jct, 2)], [jct / 10], {"preemptions": preemptions}, jct)

    r = median_result([summarise(run(x, p)) for x, p in [(1.0, 1), (5.0, 4), (2.0, 2)]])
    assert r.mean_jct_s == 2.0 and r.p99_iteration_s == pytest.approx(0.2)
    assert r.preemptions == 2 and isinstance(r.preemptions, int)
    assert r.runs_mean_jct_s == (1.0, 5.0, 2.0)
    assert sorted(r.jcts_s) == [1.0, 2.0, 5.0]


def test_the_slo_rate_is_interpolated_where_the_curve_crosses_it() -> None:
    points = [(3.0, 4.0), (1.0, 1.0), (2.0, 2.0)]  # any order
    r = max_rate_within(points, threshold_s=3.0)
    assert r.bound == "crossed" and r.rate_req_s == pytest.approx(2.5)
    exact = max_rate_within(points, threshold_s=2.0)  # on a grid point: that point
    assert exact.bound == "crossed" and exact.rate_req_s == pytest.approx(2.0)


def test_the_first_crossing_counts_even_if_a_noisy_curve_dips_back() -> None:
    r = max_rate_within([(1.0, 1.0), (2.0, 5.0), (3.0, 2.0)], threshold_s=3.0)
    assert r.rate_req_s == pytest.approx(1.5) and r.bound == "crossed"


def test_a_curve_always_within_gives_the_grids_top_rate_as_a_lower_bound() -> None:
    r = max_rate_within([(0.5, 1.0), (1.5, 1.2)], threshold_s=10.0)
    assert (r.rate_req_s, r.bound) == (1.5, "all within")


def test_a_curve_never_within_has_no_rate() -> None:
    r = max_rate_within([(0.5, 11.0), (1.5, 30.0)], threshold_s=10.0)
    assert (r.rate_req_s, r.bound) == (None, "none within")
    assert max_rate_within([], 1.0).bound == "none within"
