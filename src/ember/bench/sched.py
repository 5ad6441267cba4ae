"""`ember bench sched`: scheduling policies replayed against the engine on a trace.

Each case (a policy at a load, bench/sched_cases.py) gets a fresh engine with
identical settings over the same weights; the trace's requests arrive as token-id
prompts of the trace's (scaled) lengths, with ignore_eos so every output has the
trace's length, at the trace's own times or from a seeded gamma process. Per policy:
job completion time (JCT, arrival to last token), time to first token (TTFT), time per
output token after the first (TPOT), normalised latency, throughput, the iteration-time
distribution and the engine's preemption / swap / recomputation counters.
With an "auto" rate the arrival rate is `load` times FCFS's saturated throughput,
measured first with every request arriving at once; `loads` sweeps several loads and
adds the latency-against-load curve and each policy's highest rate within the SLO
(bench/sched_curve.py).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ember.bench.arrivals import at_rate, check_arrival_params, seeded_arrivals
from ember.bench.sched_cases import Case, PolicyResult, PolicySpec, RunCase, median_result, summarise
from ember.bench.sched_curve import REFERENCE, curve_point, plan_cases, slo_report
from ember.bench.workload import (
    TraceRequest,
    mean_rate,
    read_trace,
    with_arrivals,
    with_length_scales,
    with_rate_scale,
)
from ember.engine.options import SWAP_MODES
from ember.errors import InvalidRequestError

Progress = Callable[[str, int, int], None]  # (what runs now, cases done, cases in all)
DEFAULT_LOAD = 0.85
MAX_LOAD = 1.5


def _check_load(value: float, flag: str) -> None:
    if not (isinstance(value, int | float) and 0 < value <= MAX_LOAD):
        raise InvalidRequestError(f"{flag} must be in (0, {MAX_LOAD}], got {value}", param=flag.strip("-"))


@dataclass(frozen=True)
class SchedBenchConfig:
    """What `ember bench sched` runs; checked on creation (InvalidRequestError)."""

    model: str
    trace: str
    num_requests: int = 100
    prompt_scale: float = 0.1
    output_scale: float = 0.1
    arrivals: str = "trace"  # "trace": its own times; "gamma": generated (request_rate, burstiness, seed)
    rate_scale: float | None = None  # trace arrivals: gaps divided by this; None: auto (from load)
    request_rate: float | None = None  # gamma arrivals, req/s (inf: all at once); None: auto
    burstiness: float = 1.0
    seed: int = 0
    load: float | None = None  # None: 0.85, or the grid's highest with `loads`
    loads: tuple[float, ...] = ()  # the curve's grid (fractions of FCFS's capacity); () = no curve
    repeats: int = 1
    slo_x: float = 5.0
    policies: tuple[PolicySpec, ...] = (PolicySpec("fcfs", "fcfs"), PolicySpec("mlfq", "mlfq"))
    swaps: tuple[str | None, ...] = (None,)  # None: the engine's default mode
    max_num_seqs: int | None = None
    kv_budget: int | None = None
    swap_bytes: int | None = None  # None: the engine's default (as large as the KV budget)
    engine_options: Mapping[str, Any] | None = None  # more EngineConfig fields
    cost_model: str | None = None  # a CostModel JSON: replay on its clock; None: the real engine

    def __post_init__(self) -> None:
        if self.arrivals not in ("trace", "gamma"):
            raise InvalidRequestError(f"arrivals are 'trace' or 'gamma', got {self.arrivals!r}")
        if self.arrivals == "gamma":
            check_arrival_params(1.0 if self.request_rate is None else self.request_rate, self.burstiness)
        if self.rate_scale is not None and not self.rate_scale > 0:
            raise InvalidRequestError("--rate-scale must be positive", param="rate_scale")
        if self.load is not None:
            _check_load(self.load, "--load")
        for x in self.loads:
            _check_load(x, "--loads")
        if len(set(self.loads)) != len(self.loads):
            raise InvalidRequestError("--loads names a load twice", param="loads")
        if (self.loads or self.load is not None) and not self.auto_rate:
            raise InvalidRequestError(
                "--load and --loads are fractions of FCFS's capacity: use --rate-scale auto "
                "(trace arrivals) or --request-rate auto (generated ones)",
                param="loads",
            )
        if self.loads and REFERENCE not in (p.label for p in self.policies):
            raise InvalidRequestError(
                f"--loads measures each policy against {REFERENCE}: add {REFERENCE} to --policies",
                param="loads",
            )
        if self.repeats < 1 or self.num_requests < 1:
            raise InvalidRequestError("--repeats and --num-requests must be at least 1")
        if not self.slo_x > 0:
            raise InvalidRequestError(f"--slo-x must be positive, got {self.slo_x}", param="slo_x")
        for s in self.swaps:
            if s is not None and s not in SWAP_MODES:
                raise InvalidRequestError(
                    f"unknown swap mode {s!r}; known: {', '.join(SWAP_MODES)}", param="swap"
                )
        if len(set(self.swaps)) != len(self.swaps) or not self.swaps:
            raise InvalidRequestError("--swap names each mode at most once", param="swap")

    @property
    def auto_rate(self) -> bool:
        return (self.rate_scale if self.arrivals == "trace" else self.request_rate) is None

    @property
    def point_load(self) -> float | None:
        """The load of the "policies" block (None: a fixed rate)."""
        if not self.auto_rate:
            return None
        if self.load is not None:
            return self.load
        return max(self.loads) if self.loads else DEFAULT_LOAD

    def engine_settings(self) -> dict[str, Any]:
        """EngineConfig fields shared by every case."""
        options: dict[str, Any] = dict(self.engine_options or {})
        for key, value in (
            ("max_num_seqs", self.max_num_seqs),
            ("kv_cache_bytes", self.kv_budget),
            ("swap_bytes", self.swap_bytes),
        ):
            if value is not None:
                options[key] = value
        return options


@dataclass(frozen=True)
class _Arrivals:
    """Arrival times for any load: the trace's own or a seeded rate-1 gamma draw."""

    cfg: SchedBenchConfig
    requests: list[TraceRequest]  # lengths fitted; arrival times as in the trace
    unit: list[float]  # gamma arrivals at 1 req/s (empty for trace arrivals)
    capacity: float | None  # FCFS's saturated req/s (None: a fixed rate)

    def at(self, load: float | None) -> tuple[list[TraceRequest], float]:
        """The requests arriving at `load` (None: the fixed rate), and their rate in req/s."""
        cfg, reqs = self.cfg, self.requests
        if cfg.arrivals == "gamma":
            rate = cfg.request_rate if load is None or self.capacity is None else load * self.capacity
            assert rate is not None
            return with_arrivals(reqs, at_rate(self.unit, rate)), rate
        scaled = with_rate_scale(reqs, self.rate_scale(load) or 1.0)
        return scaled, mean_rate(scaled)

    def rate_scale(self, load: float | None) -> float | None:
        if self.cfg.arrivals == "gamma":
            return None
        native = mean_rate(self.requests)
        if load is None or self.capacity is None:
            return self.cfg.rate_scale
        return load * self.capacity / native if math.isfinite(native) else 1.0


def load_requests(cfg: SchedBenchConfig, max_model_len: int | None) -> list[TraceRequest]:
    """The trace's first requests, lengths scaled and cut to the engine's context."""
    requests = read_trace(cfg.trace, num_requests=cfg.num_requests, max_total_tokens=None)
    requests = with_length_scales(requests, cfg.prompt_scale, cfg.output_scale)
    return requests if max_model_len is None else [_fit(r, max_model_len) for r in requests]


def run_sched_bench(
    cfg: SchedBenchConfig,
    *,
    run_case: RunCase | None = None,
    max_model_len: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run every case; the JSON report (workload, the `load` point per policy, and with
    `loads` the curve and max_rate_within_slo). `run_case` None: the real-clock engine
    (bench/sched_engine.py), which also sets max_model_len."""
    if run_case is None and cfg.cost_model is not None:
        from ember.bench.sched_replay import ReplayRunner

        replayer = ReplayRunner.load(cfg.cost_model, cfg.engine_settings())
        run_case, max_model_len = replayer, replayer.max_model_len
    elif run_case is None:
        from ember.bench.sched_engine import EngineRunner

        runner = EngineRunner.load(cfg.model, cfg.engine_settings())
        run_case, max_model_len = runner, runner.max_model_len
    requests = load_requests(cfg, max_model_len)
    unit = seeded_arrivals(len(requests), 1.0, cfg.burstiness, cfg.seed) if cfg.arrivals == "gamma" else []
    capacity = None
    if cfg.auto_rate:
        if progress is not None:
            progress("measuring FCFS's capacity (every request at once)", 0, 0)
        burst = with_arrivals(requests, [0.0] * len(requests))
        saturated = run_case(burst, Case("capacity", REFERENCE))
        capacity = len(requests) / saturated.makespan_s  # requests per second, all arriving at once
    arrivals = _Arrivals(cfg, requests, unit, capacity)
    point = cfg.point_load
    grid: list[float | None] = [None]
    if point is not None:
        grid = [*sorted({*cfg.loads, point})]
    results, rates = _run_cases(cfg, arrivals, grid, run_case, progress)
    labels = list(results)
    report: dict[str, Any] = {
        "workload": _workload(cfg, arrivals, rates.get(point, 0.0), requests),
        "policies": {p: results[p][point].to_json() for p in labels},
        "_jcts": {p: list(results[p][point].jcts_s) for p in labels},
    }
    if cfg.loads:
        curve = {p: [curve_point(x, rates[x], results[p][x]) for x in sorted(cfg.loads)] for p in labels}
        report["curve"] = curve
        report["max_rate_within_slo"], report["slo"] = slo_report(curve, cfg.slo_x)
    return report


def _run_cases(
    cfg: SchedBenchConfig,
    arrivals: _Arrivals,
    grid: Sequence[float | None],
    run_case: RunCase,
    progress: Progress | None,
) -> tuple[dict[str, dict[float | None, PolicyResult]], dict[float | None, float]]:
    """Every case in interleaved order; per label and load the median over repeats."""
    from ember.engine.policies import policy

    swapping = {p.scheduler: policy(p.scheduler).swaps for p in cfg.policies}
    cases = plan_cases(cfg.policies, cfg.swaps, grid, cfg.repeats, swapping)
    workloads = {x: arrivals.at(x) for x in grid}
    runs: dict[str, dict[float | None, list[PolicyResult]]] = {}
    for i, case in enumerate(cases):
        if progress is not None:
            progress(f"{case.label} at load {case.load}, repeat {case.repeat + 1}", i, len(cases))
        result = summarise(run_case(workloads[case.load][0], case))
        runs.setdefault(case.label, {}).setdefault(case.load, []).append(result)
        if progress is not None:  # each case's headline as it ends: a long run's log says something
            r = result
            progress(
                f"{case.label} at load {case.load}, repeat {case.repeat + 1}: mean JCT {r.mean_jct_s:.2f} s, "
                f"iteration P50/P99 {r.p50_iteration_s * 1000:.0f}/{r.p99_iteration_s * 1000:.0f} ms",
                i + 1,
                len(cases),
            )
    medians = {p: {x: median_result(rs) for x, rs in by_load.items()} for p, by_load in runs.items()}
    return medians, {x: w[1] for x, w in workloads.items()}


def _workload(
    cfg: SchedBenchConfig, arrivals: _Arrivals, rate: float, requests: Sequence[TraceRequest]
) -> dict[str, Any]:
    from ember.engine.config import EngineConfig

    engine = EngineConfig(**cfg.engine_settings())
    return {
        "trace": str(cfg.trace),
        "requests": len(requests),
        "prompt_scale": cfg.prompt_scale,
        "output_scale": cfg.output_scale,
        "arrivals": cfg.arrivals,
        "burstiness": cfg.burstiness if cfg.arrivals == "gamma" else None,
        "seed": cfg.seed,
        "rate_scale": arrivals.rate_scale(cfg.point_load),
        "rate_req_s": rate,
        "load": cfg.point_load,
        "loads": sorted(cfg.loads),
        "repeats": cfg.repeats,
        "clock": "real" if cfg.cost_model is None else f"cost model {cfg.cost_model}",
        "measured_capacity_req_s": arrivals.capacity,
        "mean_prompt_tokens": statistics.fmean(r.prompt_tokens for r in requests),
        "mean_output_tokens": statistics.fmean(r.output_tokens for r in requests),
        "engine": {
            **{k: v for k, v in asdict(engine).items() if k != "scheduler"},
            "swap": [s or engine.swap for s in cfg.swaps],
        },
        "model": str(cfg.model),
    }


def _fit(r: TraceRequest, max_len: int) -> TraceRequest:
    """Cut a request to the engine's context: the output first keeps its length."""
    if r.prompt_tokens + r.output_tokens <= max_len:
        return r
    output = min(r.output_tokens, max_len // 2)
    return TraceRequest(r.arrival_s, max(1, min(r.prompt_tokens, max_len - output)), output)
