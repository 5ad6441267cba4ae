"""`ember bench sched`: scheduling policies replayed against the real engine on a trace.

Each policy gets a fresh engine with identical settings over the same weights; the
trace's requests arrive in (scaled) real time as token-id prompts of the trace's
lengths, with ignore_eos so every output has the trace's length. Per policy: job
completion time (JCT, arrival to last token), time to first token (TTFT), time per
output token after the first (TPOT), normalised latency (JCT per output token),
throughput and the engine's preemption / swap / recomputation counters.
With rate "auto" the arrival rate is `load` times FCFS's saturated throughput, measured
first with every request arriving at once.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ember.bench.workload import TraceRequest, mean_rate, read_trace, synthetic_prompt, with_rate_scale
from ember.errors import InvalidRequestError

Progress = Callable[[str, int, int], None]


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
class PolicyResult:
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
    preemptions: int
    swaps_out: int
    swaps_in: int
    recomputations: int
    jcts_s: tuple[float, ...]  # every request's JCT, for the CDF (left out of the JSON)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("jcts_s")
        return data


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(timings: Sequence[RequestTiming], makespan_s: float, stats: Any) -> PolicyResult:
    jct = [t.jct for t in timings]
    ttft = [t.ttft for t in timings]
    tpot = [x for t in timings if (x := t.tpot) is not None] or [0.0]
    tokens = sum(t.output_tokens for t in timings)
    return PolicyResult(
        statistics.fmean(jct),
        percentile(jct, 50),
        percentile(jct, 99),
        statistics.fmean(ttft),
        percentile(ttft, 50),
        percentile(ttft, 99),
        statistics.fmean(tpot),
        percentile(tpot, 50),
        percentile(tpot, 99),
        statistics.fmean(t.jct / t.output_tokens for t in timings),
        tokens / makespan_s if makespan_s > 0 else 0.0,
        stats.num_preemptions,
        stats.num_swaps_out,
        stats.num_swaps_in,
        stats.num_recomputations,
        tuple(jct),
    )


def replay(
    engine: Any, requests: Sequence[TraceRequest], *, progress: Progress | None = None
) -> PolicyResult:
    """Replay the requests against the engine in real time; their timings and counters."""
    from ember.engine.request import EngineRequest, SamplingParams

    vocab = engine.vocab_size
    pending = [
        EngineRequest.make(
            f"req-{i}",
            synthetic_prompt(i, r.prompt_tokens, vocab),
            SamplingParams(temperature=0, max_tokens=r.output_tokens, ignore_eos=True),
        )
        for i, r in enumerate(requests)
    ]
    arrival = {f"req-{i}": r.arrival_s for i, r in enumerate(requests)}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    got: dict[str, int] = {}
    nxt = 0
    start = time.monotonic()
    while len(done) < len(requests):
        now = time.monotonic() - start
        while nxt < len(pending) and requests[nxt].arrival_s <= now:
            engine.add_request(pending[nxt])
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(requests[nxt].arrival_s - now, 0.05)))
            continue
        outputs = engine.step()
        now = time.monotonic() - start
        for out in outputs:
            rid = out.request_id
            got[rid] = got.get(rid, 0) + len(out.outputs[0].token_ids)
            first.setdefault(rid, now)
            if out.finished:
                done[rid] = now
                if progress is not None:
                    progress("replaying", len(done), len(requests))
    makespan = max(done.values()) - requests[0].arrival_s
    timings = [RequestTiming(arrival[r], first[r], done[r], got[r]) for r in done]
    return summarise(timings, makespan, engine.stats())


@dataclass(frozen=True)
class SchedBenchConfig:
    model: str
    trace: str
    num_requests: int = 100
    length_scale: float = 0.1
    rate_scale: float | None = None  # None: auto, from FCFS's measured capacity
    load: float = 0.85
    policies: tuple[str, ...] = ("fcfs", "mlfq", "srpt")
    swap: str | None = None  # None: the engine's default
    kv_budget: int | None = None
    swap_bytes: int | None = None  # None: the engine's default (as large as the KV budget)
    engine_options: Mapping[str, Any] | None = None  # more EngineConfig fields


def run_sched_bench(cfg: SchedBenchConfig, *, progress: Progress | None = None) -> dict[str, Any]:
    """Run every policy on the trace; the JSON report (workload, then per-policy results)."""
    from ember.engine.config import EngineConfig
    from ember.engine.loader import load_engine, resolve_checkpoint
    from ember.engine.output_lengths import OutputLengths
    from ember.engine.policies import POLICY_NAMES, is_policy_name
    from ember.store import load_tensors

    for p in cfg.policies:
        if not is_policy_name(p):
            raise InvalidRequestError(
                f"unknown policy {p!r}; known: {', '.join(POLICY_NAMES)}", param="policies"
            )
    if not 0 < cfg.load <= 1.5:
        raise InvalidRequestError(f"load must be in (0, 1.5], got {cfg.load}", param="load")
    checkpoint = resolve_checkpoint(cfg.model)
    options: dict[str, Any] = dict(cfg.engine_options or {})
    if cfg.swap is not None:
        options["swap"] = cfg.swap
    if cfg.kv_budget is not None:
        options["kv_cache_bytes"] = cfg.kv_budget
    if cfg.swap_bytes is not None:
        options["swap_bytes"] = cfg.swap_bytes
    base = EngineConfig(**options)
    weights = load_tensors(checkpoint, device=base.torch_device)

    def engine(policy: str) -> Any:
        # every run learns output lengths from the prior, in memory: nothing carries over
        e = load_engine(
            checkpoint, base.replace(scheduler=policy), weights=weights, lengths=OutputLengths.prior()
        )
        _warm_up(e)
        return e

    requests = read_trace(
        cfg.trace, num_requests=cfg.num_requests, length_scale=cfg.length_scale, max_total_tokens=None
    )
    probe = engine("fcfs")
    limit = probe.max_model_len
    requests = [_fit(r, limit) for r in requests]
    capacity = None
    rate_scale = cfg.rate_scale
    if rate_scale is None:
        burst = [TraceRequest(0.0, r.prompt_tokens, r.output_tokens) for r in requests]
        saturated = replay(probe, burst, progress=progress)
        probe.close()
        capacity = len(requests) / max(saturated.jcts_s)  # requests per second, all arriving at once
        native = mean_rate(requests)
        rate_scale = cfg.load * capacity / native if native != float("inf") else 1.0
    else:
        probe.close()
    scaled = with_rate_scale(requests, rate_scale)
    results: dict[str, PolicyResult] = {}
    for policy in cfg.policies:
        e = engine(policy)
        try:
            results[policy] = replay(e, scaled, progress=progress)
        finally:
            e.close()
    workload = {
        "trace": str(cfg.trace),
        "requests": len(requests),
        "length_scale": cfg.length_scale,
        "rate_scale": rate_scale,
        "rate_req_s": mean_rate(scaled),
        "load": cfg.load if cfg.rate_scale is None else None,
        "measured_capacity_req_s": capacity,
        "mean_prompt_tokens": statistics.fmean(r.prompt_tokens for r in requests),
        "mean_output_tokens": statistics.fmean(r.output_tokens for r in requests),
        "engine": {k: v for k, v in asdict(base).items() if k != "scheduler"},
        "model": str(cfg.model),
    }
    return {
        "workload": workload,
        "policies": {p: r.to_json() for p, r in results.items()},
        "_jcts": {p: list(r.jcts_s) for p, r in results.items()},
    }


def _fit(r: TraceRequest, max_len: int) -> TraceRequest:
    """Cut a request to the engine's context: the output first keeps its length."""
    if r.prompt_tokens + r.output_tokens <= max_len:
        return r
    output = min(r.output_tokens, max_len // 2)
    return TraceRequest(r.arrival_s, max(1, min(r.prompt_tokens, max_len - output)), output)


def _warm_up(engine: Any) -> None:
    """One short request, so first-iteration costs (thread pools, allocations) are not timed."""
    from ember.engine.request import EngineRequest, SamplingParams

    engine.add_request(
        EngineRequest.make(
            "warm-up", synthetic_prompt(-1, 8, engine.vocab_size), SamplingParams(max_tokens=2)
        )
    )
    while engine.has_unfinished():
        engine.step()


def plot_jct_cdf(jcts: Mapping[str, Sequence[float]], path: str | Path, title: str) -> None:
    """The CDF of job completion time per policy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, values in jcts.items():
        xs = sorted(values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=policy)
    ax.set_xlabel("job completion time (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # e.g. results/, ignored by git
    fig.savefig(path, dpi=120)
    plt.close(fig)
