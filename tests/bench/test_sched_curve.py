"""`ember bench sched`'s own logic, on a fake RunCase (no model): which cases run in
which order at which arrival times, and the report's curve, medians and SLO rates."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest

from ember.bench.sched import SchedBenchConfig, run_sched_bench
from ember.bench.sched_cases import Case, CaseResult, RequestTiming, parse_policies
from ember.bench.workload import TraceRequest
from ember.errors import InvalidRequestError

N = 20
PROBE_MAKESPAN_S = 10.0  # the fake FCFS finishes N requests arriving at once in 10 s: 2 req/s
CAPACITY = N / PROBE_MAKESPAN_S
SLOPE = {"fcfs": 0.9, "mlfq": 0.5, "srpt": 0.4}  # slowdown 1 / (1 - slope * load)


class FakeRunner:
    """Each job takes (0.1 + 0.01 * output tokens) s times its policy's slowdown at the
    case's load, plus `noise[repeat]`; the cases and their requests are recorded."""

    def __init__(self, noise: Sequence[float] = (0.0,)) -> None:
        self.cases: list[Case] = []
        self.requests: list[list[TraceRequest]] = []
        self.noise = noise

    def __call__(self, requests: Sequence[TraceRequest], case: Case) -> CaseResult:
        self.cases.append(case)
        self.requests.append(list(requests))
        if case.load is None:  # the capacity probe
            return CaseResult([RequestTiming(0.0, 1.0, 1.0, 1)], [0.1], {}, PROBE_MAKESPAN_S)
        slow = 1 / (1 - SLOPE[case.scheduler] * case.load) + self.noise[case.repeat]
        timings = [
            RequestTiming(r.arrival_s, r.arrival_s + 0.05, r.arrival_s + _service(r) * slow, r.output_tokens)
            for r in requests
        ]
        iters = [0.01 * slow * (i + 1) for i in range(10)]
        return CaseResult(timings, iters, {"preemptions": case.repeat}, max(t.finish_s for t in timings))


def _service(r: TraceRequest) -> float:
    return 0.1 + 0.01 * r.output_tokens


def _trace(tmp_path: Path) -> Path:
    rows = [f"{i * 0.5 + (i % 3) * 0.2},{100 + 10 * i},{10 + 5 * (i % 4)}" for i in range(N)]
    path = tmp_path / "trace.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + "\n".join(rows) + "\n")
    return path


def _cfg(tmp_path: Path, **kw: object) -> SchedBenchConfig:
    base: dict[str, object] = {
        "model": "fake", "trace": str(_trace(tmp_path)), "num_requests": N,
        "prompt_scale": 0.5, "output_scale": 1.0, "policies": parse_policies("fcfs,mlfq"),
    }  # fmt: skip
    return SchedBenchConfig(**(base | kw))  # type: ignore[arg-type]


def test_the_curve_has_every_policy_at_every_load_and_the_slo_rates(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, loads=(1.0, 0.1, 0.5), load=1.0)
    report = run_sched_bench(cfg, run_case=FakeRunner())
    assert set(report) == {"workload", "policies", "_jcts", "curve", "max_rate_within_slo", "slo"}
    assert report["workload"]["measured_capacity_req_s"] == pytest.approx(CAPACITY)
    assert report["workload"]["loads"] == [0.1, 0.5, 1.0]
    keys = {"load", "rate_req_s", "mean_jct_s", "p50_jct_s", "p99_jct_s", "mean_ttft_s", "p50_ttft_s",
            "p99_ttft_s", "p50_iteration_s", "p90_iteration_s", "p99_iteration_s"}  # fmt: skip
    for policy in ("fcfs", "mlfq"):
        points = report["curve"][policy]
        assert [p["load"] for p in points] == [0.1, 0.5, 1.0]
        assert all(keys <= set(p) for p in points)
        assert [p["rate_req_s"] for p in points] == pytest.approx([0.2, 1.0, 2.0])  # load x capacity
        assert {k: v for k, v in points[-1].items() if k not in ("load", "rate_req_s")} == report["policies"][
            policy
        ]  # the --load point is the curve's point at that load
    # fcfs: slowdowns 1/0.91, 1/0.55, 1/0.1 of the same mean service time; the SLO is 5 x the first
    s = [1 / (1 - 0.9 * x) for x in (0.1, 0.5, 1.0)]
    crossing = 1.0 + (5 * s[0] - s[1]) / (s[2] - s[1]) * (2.0 - 1.0)
    assert report["max_rate_within_slo"]["fcfs"] == pytest.approx(crossing)
    assert report["max_rate_within_slo"]["mlfq"] == pytest.approx(2.0)
    slo = report["slo"]
    assert slo["bound"] == {"fcfs": "crossed", "mlfq": "all within"}
    assert slo["reference_load"] == 0.1
    assert slo["threshold_s"] == pytest.approx(5 * report["curve"]["fcfs"][0]["mean_jct_s"])


def test_cases_are_interleaved_and_repeats_give_medians(tmp_path: Path) -> None:
    runner = FakeRunner(noise=(0.0, 3.0, 1.0))
    cfg = _cfg(tmp_path, loads=(0.1, 0.5), repeats=3, policies=parse_policies("fcfs,mlfq,fcfs@512"))
    report = run_sched_bench(cfg, run_case=runner)
    order = [(c.load, c.label, c.repeat) for c in runner.cases]
    assert order[0] == (None, "capacity", 0)
    assert order[1:10] == [
        (0.1, "fcfs", 0), (0.1, "mlfq", 0), (0.1, "fcfs@512", 0),
        (0.1, "mlfq", 1), (0.1, "fcfs@512", 1), (0.1, "fcfs", 1),
        (0.1, "fcfs@512", 2), (0.1, "fcfs", 2), (0.1, "mlfq", 2),
    ]  # fmt: skip
    assert len(order) == 1 + 2 * 3 * 3  # the --load point is the top of the grid: no extra run
    assert {c.max_num_batched_tokens for c in runner.cases if c.label == "fcfs@512"} == {512}
    assert {c.scheduler for c in runner.cases if c.label == "fcfs@512"} == {"fcfs"}
    point = report["policies"]["fcfs"]
    assert len(point["runs_mean_jct_s"]) == 3
    assert point["mean_jct_s"] == sorted(point["runs_mean_jct_s"])[1]  # the median run's (noise +1)
    assert point["preemptions"] == 1  # median of 0, 1, 2
    assert report["workload"]["load"] == 0.5


def test_generated_arrivals_keep_their_pattern_across_loads(tmp_path: Path) -> None:
    runner = FakeRunner()
    cfg = _cfg(tmp_path, arrivals="gamma", burstiness=0.5, seed=3, loads=(0.2, 0.8), load=0.5)
    report = run_sched_bench(cfg, run_case=runner)
    by_load = {
        c.load: reqs for c, reqs in zip(runner.cases, runner.requests, strict=True) if c.label == "fcfs"
    }
    assert set(by_load) == {0.2, 0.5, 0.8}  # an extra --load point off the grid runs too
    assert set(report["curve"]["fcfs"][i]["load"] for i in range(2)) == {0.2, 0.8}
    low, high = by_load[0.2], by_load[0.8]
    assert [r.arrival_s * 0.2 for r in low] == pytest.approx([r.arrival_s * 0.8 for r in high])
    assert [r.output_tokens for r in low] == [r.output_tokens for r in high]
    assert report["curve"]["mlfq"][1]["rate_req_s"] == pytest.approx(0.8 * CAPACITY)  # the nominal rate
    again = FakeRunner()
    run_sched_bench(cfg, run_case=again)
    assert again.requests == runner.requests  # seeded
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(low)]
    assert len(set(gaps)) > 1  # generated, not the trace's regular gaps


def test_trace_arrivals_are_scaled_to_the_load_and_lengths_separately(tmp_path: Path) -> None:
    runner = FakeRunner()
    report = run_sched_bench(_cfg(tmp_path, load=0.5, prompt_scale=0.1, output_scale=2.0), run_case=runner)
    reqs = runner.requests[1]
    assert [r.prompt_tokens for r in reqs[:3]] == [10, 11, 12]  # 100, 110, 120 x 0.1
    assert [r.output_tokens for r in reqs[:4]] == [20, 30, 40, 50]  # 10..25 x 2
    assert (N - 1) / reqs[-1].arrival_s == pytest.approx(0.5 * CAPACITY)
    assert report["workload"]["rate_req_s"] == pytest.approx(0.5 * CAPACITY)
    assert "curve" not in report and "max_rate_within_slo" not in report


def test_a_swap_list_compares_modes_for_policies_that_swap(tmp_path: Path) -> None:
    runner = FakeRunner()
    report = run_sched_bench(_cfg(tmp_path, load=0.5, swaps=("proactive", "off")), run_case=runner)
    assert list(report["policies"]) == ["fcfs", "mlfq/proactive", "mlfq/off"]  # fcfs never swaps: one row
    assert {(c.label, c.swap) for c in runner.cases[1:]} == {
        ("fcfs", "proactive"), ("mlfq/proactive", "proactive"), ("mlfq/off", "off")
    }  # fmt: skip
    assert report["workload"]["engine"]["swap"] == ["proactive", "off"]


def test_a_fixed_rate_needs_no_capacity_probe(tmp_path: Path) -> None:
    runner = FakeRunner()
    cfg = _cfg(tmp_path, arrivals="gamma", request_rate=4.0)
    run_sched_bench(cfg, run_case=runner)
    assert [c.label for c in runner.cases] == ["fcfs", "mlfq"]
    assert all(c.load is None for c in runner.cases)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"loads": (0.5, 0.5)}, "twice"),
        ({"loads": (0.0, 0.5)}, "loads must be in"),
        ({"loads": (0.5, 2.0)}, "loads must be in"),
        ({"load": 0.0}, "load must be in"),
        ({"loads": (0.5,), "policies": parse_policies("mlfq,fcfs@512")}, "add fcfs"),
        ({"loads": (0.5,), "rate_scale": 2.0}, "fractions of FCFS's capacity"),
        ({"arrivals": "gamma", "request_rate": 2.0, "load": 0.5}, "fractions of FCFS's capacity"),
        ({"arrivals": "gamma", "burstiness": 0.0}, "burstiness"),
        ({"arrivals": "gamma", "request_rate": 0.0}, "request-rate"),
        ({"swaps": ("sideways",)}, "unknown swap mode"),
        ({"slo_x": 0.0}, "slo-x"),
        ({"repeats": 0}, "repeats"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path: Path, kw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        _cfg(tmp_path, **kw)
