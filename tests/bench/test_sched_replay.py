"""The replay of the real schedulers on a cost-model clock (ember.bench.sched_replay)."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from ember.bench.sched_cost import CostModel
from ember.bench.sched_replay import replay
from ember.bench.workload import TraceRequest
from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.request import EngineRequest, SamplingParams
from ember.engine.scheduler import SchedulerOutput
from ember.errors import InvalidRequestError
from tests.engine.fakes import FakeKVCache, FakeModel

KV_PER_TOKEN = 1000  # bytes: a block of 16 tokens is 16 kB
COST = CostModel((0.01, 2e-4, 0.05, 5e-4, 0.01), swap_bytes_per_s=1e8, kv_bytes_per_token=KV_PER_TOKEN)


def settings(blocks: int = 64, **kw: object) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=256, kv_cache_bytes=blocks * 16 * KV_PER_TOKEN, **kw
    )  # type: ignore[arg-type]


def heavy_tailed(n: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    """Poisson arrivals; a fifth of the outputs 100-200 tokens, the rest 2-12."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        output = rng.randint(100, 200) if rng.random() < 0.2 else rng.randint(2, 12)
        out.append(TraceRequest(t, rng.randint(8, 120), output))
    return out


def mean_jct(requests: list[TraceRequest], policy: str, cfg: EngineConfig) -> float:
    return statistics.fmean(t.jct for t in replay(requests, policy, cfg, COST).timings)


@pytest.mark.parametrize("policy", ["fcfs", "mlfq", "srpt"])
def test_replay_is_deterministic(policy: str) -> None:
    requests = heavy_tailed(60, rate=3.0)
    assert replay(requests, policy, settings(24), COST) == replay(requests, policy, settings(24), COST)


@pytest.mark.parametrize("swap", ["proactive", "reactive", "off"])
@pytest.mark.parametrize("policy", ["fcfs", "mlfq", "srpt"])
def test_every_request_finishes_with_its_output_length(policy: str, swap: str) -> None:
    requests = heavy_tailed(60, rate=3.0)
    result = replay(requests, policy, settings(24, swap=swap), COST)  # tight: 384 tokens of KV
    assert [t.output_tokens for t in result.timings] == [r.output_tokens for r in requests]
    for t, r in zip(result.timings, requests, strict=True):
        assert t.arrival_s == r.arrival_s <= t.first_token_s <= t.finish_s
    assert result.makespan_s == pytest.approx(max(t.finish_s for t in result.timings) - requests[0].arrival_s)
    # the KV budget is a real block allocator: jobs are pushed out of it
    pushed_out = result.counters["num_swaps_out"] + result.counters["num_recomputations"]
    assert pushed_out > 0
    if policy == "fcfs" or swap == "off":
        assert result.counters["num_swaps_out"] == 0


def test_the_clock_is_the_sum_of_the_iterations_when_all_arrive_at_once() -> None:
    requests = [TraceRequest(0.0, 40 + 10 * i, 5 + i) for i in range(10)]
    result = replay(requests, "fcfs", settings(), COST)
    assert result.makespan_s == pytest.approx(sum(result.iteration_s))
    assert len(result.iteration_s) >= max(r.output_tokens for r in requests)


def test_swapped_bytes_cost_time() -> None:
    requests = heavy_tailed(60, rate=3.0)
    slow = CostModel(COST.coef, swap_bytes_per_s=1e6, kv_bytes_per_token=KV_PER_TOKEN)
    fast, slowed = replay(requests, "mlfq", settings(24), COST), replay(requests, "mlfq", settings(24), slow)
    assert fast.counters["swap_bytes_out"] > 0
    assert sum(slowed.iteration_s) > sum(fast.iteration_s)


def test_srpt_beats_fcfs_on_heavy_tails() -> None:
    requests = heavy_tailed(150, rate=2.5)
    cfg = settings(48)
    assert mean_jct(requests, "srpt", cfg) <= mean_jct(requests, "fcfs", cfg)


def test_a_request_larger_than_the_kv_budget_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequestError):
        replay([TraceRequest(0.0, 2000, 10)], "fcfs", settings(8), COST)


# -- Engine(run_batch=...) schedules exactly as the engine with its model ------------


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


Batch = tuple[tuple[str, int, int], ...]  # (id, start, new tokens) per scheduled sequence


def drive(engine: Engine, requests: list[EngineRequest]) -> tuple[list[Batch], list[list[int]]]:
    """Run the requests (three join per step); every iteration's batch, and the tokens
    sampled by each iteration that computed something."""
    batches: list[Batch] = []
    schedule = engine.scheduler.schedule

    def schedule_and_record() -> SchedulerOutput:
        out = schedule()
        batches.append(tuple((s.seq.request_id, s.start, s.num_new_tokens) for s in out.scheduled))
        return out

    engine.scheduler.schedule = schedule_and_record  # type: ignore[method-assign]
    tokens: list[list[int]] = []

    def step() -> None:
        outputs = engine.step()
        if batches[-1]:
            tokens.append([o.outputs[0].token_ids[0] for o in outputs])

    for i, r in enumerate(requests):
        engine.add_request(r)
        if i % 3 == 2:
            step()
    while engine.has_unfinished():
        step()
    engine.close()
    return batches, tokens


@pytest.mark.parametrize("policy", ["fcfs", "mlfq", "srpt"])
def test_run_batch_schedules_like_the_model(policy: str) -> None:
    rng = random.Random(3)
    requests = [
        EngineRequest.make(
            f"r{i}",
            [rng.randrange(97) for _ in range(rng.randint(3, 30))],
            SamplingParams(temperature=0, max_tokens=rng.randint(1, 20), ignore_eos=True),
        )
        for i in range(12)
    ]
    config = EngineConfig(
        device="cpu", block_size=4, scheduler=policy, max_num_seqs=4, max_num_batched_tokens=24,
        mlfq_base_quantum_s=0.02,
    )  # fmt: skip
    real = Engine(FakeModel(), FakeKVCache(24, 4), config, clock=Ticks(), timer=Ticks())
    batches, tokens = drive(real, requests)
    assert real.stats().num_preemptions > 0  # 96 tokens of KV: jobs are pushed out
    # the same engine with run_batch handing back the tokens the model sampled
    recorded = iter(tokens)
    stand_in = FakeModel()
    replayed = Engine(
        stand_in, FakeKVCache(24, 4), config, clock=Ticks(), timer=Ticks(), run_batch=lambda _: next(recorded)
    )
    assert drive(replayed, requests) == (batches, tokens)
    assert stand_in.calls == []  # no forward ran


def test_bench_sched_on_a_cost_model_replays_every_case_the_same_way_twice(tmp_path: Path) -> None:
    from ember.bench.sched import SchedBenchConfig, run_sched_bench
    from ember.bench.sched_cases import parse_policies

    rows = heavy_tailed(40, rate=1.0)
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "arrived_at,num_prefill_tokens,num_decode_tokens\n"
        + "".join(f"{r.arrival_s},{r.prompt_tokens},{r.output_tokens}\n" for r in rows)
    )
    cost = tmp_path / "cost.json"
    COST.save(cost)
    cfg = SchedBenchConfig(
        model="unused: a replay loads no weights", trace=str(trace), num_requests=40,
        prompt_scale=1.0, output_scale=1.0, policies=parse_policies("fcfs,mlfq,gittins,srpt,fcfs@64"),
        loads=(0.5, 0.9), max_num_seqs=8, kv_budget=48 * 16 * KV_PER_TOKEN, cost_model=str(cost),
    )  # fmt: skip
    first, again = run_sched_bench(cfg), run_sched_bench(cfg)
    assert first == again
    assert first["workload"]["clock"] == f"cost model {cost}"
    assert set(first["curve"]) == {"fcfs", "mlfq", "gittins", "srpt", "fcfs@64"}
    assert all(p["mean_jct_s"] > 0 for points in first["curve"].values() for p in points)
    assert first["policies"]["srpt"]["mean_jct_s"] <= first["policies"]["fcfs"]["mean_jct_s"]
