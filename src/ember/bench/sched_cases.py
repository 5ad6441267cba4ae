"""The seam between `ember bench sched` and whatever runs its cases.

A `Case` is one policy at one load (and swap mode, token budget, repeat); a `RunCase`
replays the requests under it and returns a `CaseResult`: each request's timings, each
iteration's duration, the engine's counters and the makespan. The real-clock engine
(bench/sched_engine.py) is the default `RunCase`; a cost-model replay or a test's fake
plugs in the same way. Also here: the `--policies` vocabulary (NAME, `default`,
NAME@TOKENS) and the per-policy summary of a case's result.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from ember.bench.workload import TraceRequest
from ember.engine.options import DEFAULT_SCHEDULER, SCHEDULERS
from ember.errors import InvalidRequestError

DEFAULT_POLICY = "default"  # `ember serve`'s policy (DEFAULT_SCHEDULER), reported under this name


@dataclass(frozen=True)
class RequestTiming:
    arrival_s: float
    first_token_s: float
    finish_s: float
    output_tokens: int

    @property
    def jct(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens - 1
        return (self.finish_s - self.first_token_s) / n if n > 0 else None


@dataclass(frozen=True)
class PolicySpec:
    """One entry of --policies: `label` as reported, the engine's scheduler name and
    its own max_num_batched_tokens (None: the shared setting)."""

    label: str
    scheduler: str
    max_num_batched_tokens: int | None = None


@dataclass(frozen=True)
class Case:
    """One replay: `label` names the row it reports under; load None = all requests at
    once (the capacity probe) or a fixed rate."""

    label: str
    scheduler: str
    swap: str | None = None  # None: the engine's default
    load: float | None = None
    max_num_batched_tokens: int | None = None  # None: the shared setting
    repeat: int = 0


@dataclass(frozen=True)
class CaseResult:
    timings: list[RequestTiming]  # one per request, in any order
    iteration_s: list[float]  # wall (or model) seconds of every engine iteration that ran a batch
    counters: dict[str, int]  # preemptions, swaps_out, swaps_in, recomputations
    makespan_s: float  # first arrival to last finish


RunCase = Callable[[Sequence[TraceRequest], Case], CaseResult]


def parse_policy(text: str) -> PolicySpec:
    """NAME, `default` or NAME@TOKENS (that policy at max_num_batched_tokens TOKENS)."""
    name, at, tokens = text.strip().partition("@")
    known = (DEFAULT_POLICY, *SCHEDULERS)
    if name not in known:
        raise InvalidRequestError(
            f"unknown policy {name!r} in --policies; known: {', '.join(known)} (each may take @TOKENS)",
            param="policies",
        )
    scheduler = DEFAULT_SCHEDULER if name == DEFAULT_POLICY else name
    if not at:
        return PolicySpec(name, scheduler)
    if not (tokens.isdigit() and int(tokens) > 0):
        raise InvalidRequestError(
            f"{text.strip()!r}: after @ comes max_num_batched_tokens, a positive integer (e.g. fcfs@512)",
            param="policies",
        )
    return PolicySpec(f"{name}@{int(tokens)}", scheduler, int(tokens))


def parse_policies(text: str) -> tuple[PolicySpec, ...]:
    """Comma-separated --policies; at least one, no label twice."""
    specs = tuple(parse_policy(p) for p in text.split(",") if p.strip())
    if not specs:
        raise InvalidRequestError("give at least one policy", param="policies")
    labels = [s.label for s in specs]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise InvalidRequestError(f"--policies names {', '.join(twice)} twice", param="policies")
    return specs


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass(frozen=True)
class PolicyResult:
    """One policy's figures at one load (medians over repeats when there are several)."""

    mean_jct_s: float
    p50_jct_s: float
    p99_jct_s: float
    mean_ttft_s: float
    p50_ttft_s: float
    p99_ttft_s: float
    mean_tpot_s: float
    p50_tpot_s: float
    p99_tpot_s: float
    mean_norm_latency_s: float
    throughput_tok_s: float
    p50_iteration_s: float
    p90_iteration_s: float
    p99_iteration_s: float
    iterations: int
    preemptions: int
    swaps_out: int
    swaps_in: int
    recomputations: int
    runs_mean_jct_s: tuple[float, ...]  # every repeat's mean JCT: the spread
    jcts_s: tuple[float, ...]  # every request's JCT of every repeat, for the CDF (not in the JSON)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("jcts_s")
        data["runs_mean_jct_s"] = list(self.runs_mean_jct_s)
        return data


def summarise(result: CaseResult) -> PolicyResult:
    """The figures of one case's replay."""
    timings, iters = result.timings, result.iteration_s
    if not timings:
        raise InvalidRequestError("a case finished no request", param="trace")
    jct = [t.jct for t in timings]
    ttft = [t.ttft for t in timings]
    tpot = [x for t in timings if (x := t.tpot) is not None] or [0.0]
    tokens = sum(t.output_tokens for t in timings)
    c = result.counters
    mean_jct = statistics.fmean(jct)
    return PolicyResult(
        mean_jct, percentile(jct, 50), percentile(jct, 99),
        statistics.fmean(ttft), percentile(ttft, 50), percentile(ttft, 99),
        statistics.fmean(tpot), percentile(tpot, 50), percentile(tpot, 99),
        statistics.fmean(t.jct / t.output_tokens for t in timings),
        tokens / result.makespan_s if result.makespan_s > 0 else 0.0,
        percentile(iters, 50), percentile(iters, 90), percentile(iters, 99), len(iters),
        c.get("preemptions", 0), c.get("swaps_out", 0), c.get("swaps_in", 0), c.get("recomputations", 0),
        (mean_jct,), tuple(jct),
    )  # fmt: skip


def median_result(runs: Sequence[PolicyResult]) -> PolicyResult:
    """Each figure's median over repeats; the spread of mean JCT and every JCT kept."""
    if len(runs) == 1:
        return runs[0]
    values: dict[str, Any] = {}
    for f in fields(PolicyResult):
        if f.name in ("runs_mean_jct_s", "jcts_s"):
            values[f.name] = tuple(x for r in runs for x in getattr(r, f.name))
            continue
        m = statistics.median(getattr(r, f.name) for r in runs)
        values[f.name] = round(m) if f.type in ("int", int) else m
    return PolicyResult(**values)
