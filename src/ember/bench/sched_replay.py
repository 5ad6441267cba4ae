"""A deterministic replay of the real schedulers on a cost-model clock.

The real Engine (engine/engine.py) runs with the real registered policy
(engine/policies.py), the real block allocator and swapper sized to the configured KV
budget, so preemption, swapping and recomputation happen exactly as they would; only
the model forward is replaced (`Engine(run_batch=...)`): every sequence that samples
gets the same token (never an end of sequence: outputs end at max_tokens, ignore_eos,
as in `ember bench sched`), and a virtual clock advances by the cost model's
prediction of the iteration plus the time to copy the KV bytes it swapped. Requests
arrive at their trace times on that clock. Nothing reads the wall clock, so the same
inputs give the same result, and a replay of 300 requests (1,500-3,500 iterations)
takes about a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ember.bench.sched_cases import Case, CaseResult, RequestTiming
from ember.bench.sched_cost import CostModel
from ember.bench.sched_engine import case_config
from ember.bench.workload import TraceRequest
from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.prefill_profile import PrefillProfile
from ember.engine.request import EngineRequest, SamplingParams
from ember.engine.scheduler import SchedulerOutput
from ember.errors import InternalError, InvalidRequestError

TOKEN = 100  # every sampled token (the engine here knows no end-of-sequence token)
COUNTERS = ("num_preemptions", "num_swaps_out", "num_swaps_in", "num_recomputations")
MAX_IDLE_STEPS = 1000  # steps in a row that compute nothing while no request is due: a stuck scheduler


@dataclass(frozen=True)
class ReplayResult:
    """What `ember bench sched` measures of one run, on the virtual clock (seconds from
    the first arrival)."""

    timings: list[RequestTiming]  # in request order
    iteration_s: list[float]  # every iteration's predicted time, swaps included
    counters: dict[str, int]  # the engine's stats: COUNTERS and swap bytes each way
    makespan_s: float


class VirtualClock:
    """Time that moves only when told: the engine's and the schedulers' clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class _Spec:
    vocab_size: int
    max_position_embeddings: int


class _NoModel:
    """The engine's model when run_batch stands in for it: only its sizes are read."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec

    def forward(self, *args: Any) -> torch.Tensor:
        raise InternalError("a replay runs no model forward")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise InternalError("a replay runs no model forward")


class NullKVCache:
    """A KV cache of `num_blocks` blocks without storage: the block manager and swapper
    count its blocks, and a copy moves nothing (its time is the cost model's)."""

    def __init__(self, num_blocks: int, block_size: int, block_bytes: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_bytes = block_bytes
        self.device = torch.device("cpu")

    def copy_blocks_out(self, block_ids: Sequence[int], *, pin: bool = False) -> None:
        return None

    def copy_blocks_in(self, block_ids: Sequence[int], data: Any) -> None:
        return None


class CostRunner:
    """Stands in for the forward (Engine's run_batch): advances the clock by the cost
    model's time for the batch and for the KV bytes swapped since the last batch."""

    def __init__(self, cost: CostModel, clock: VirtualClock) -> None:
        self.cost = cost
        self.clock = clock
        self.engine: Engine | None = None  # set once built: its swapper counts the bytes
        self.iterations: list[float] = []
        self._moved = 0  # KV bytes swapped so far

    def __call__(self, batch: SchedulerOutput) -> list[int]:
        scheduled = batch.scheduled
        seconds = self.cost.iteration_s([s.num_new_tokens for s in scheduled], [s.start for s in scheduled])
        if self.engine is not None:
            w = self.engine.swapper
            moved = w.swap_bytes_out + w.swap_bytes_in
            # in series with the iteration: on a CPU the copies take the forward's cores
            # and memory bandwidth
            seconds += self.cost.swap_s(moved - self._moved)
            self._moved = moved
        self.clock.now += seconds
        self.iterations.append(seconds)
        return [TOKEN for s in scheduled if s.samples]


def replay_engine(policy_name: str, settings: EngineConfig, cost: CostModel, clock: VirtualClock) -> Engine:
    """An engine with the policy and settings, no model, a storage-free KV cache of the
    budget's blocks, a profile seeded as a warmed-up instance's would be, and a
    CostRunner (its `run_batch`) on `clock`."""
    config = settings.replace(scheduler=policy_name, device="cpu")
    block_bytes = cost.kv_bytes_per_token * config.block_size
    num_blocks = config.default_kv_bytes(torch.device("cpu")) // block_bytes
    if num_blocks < 1:
        raise InvalidRequestError(
            f"kv_cache_bytes={config.kv_cache_bytes} holds no block of {block_bytes} bytes",
            param="kv_cache_bytes",
        )
    profile = PrefillProfile()  # in memory: nothing learnt in a replay is saved
    for q in (16, 128, 512, 1024):
        profile.observe([q], [0], cost.iteration_s([q], [0]))
    for _ in range(3):
        profile.observe([1] * 8, [256] * 8, cost.iteration_s([1] * 8, [256] * 8))
    kv = NullKVCache(num_blocks, config.block_size, block_bytes)
    spec = _Spec(cost.vocab_size, cost.max_position_embeddings)
    runner = CostRunner(cost, clock)
    engine = Engine(_NoModel(spec), kv, config, clock=clock, timer=clock, profile=profile, run_batch=runner)
    engine.swapper.background = False  # copies are no-ops: no worker thread
    runner.engine = engine
    return engine


def replay(
    requests: Sequence[TraceRequest], policy_name: str, settings: EngineConfig, cost: CostModel
) -> ReplayResult:
    """Run the requests through the engine under `policy_name` on the virtual clock."""
    clock = VirtualClock()
    engine = replay_engine(policy_name, settings, cost, clock)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)  # stable
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    got = [0] * len(requests)
    nxt = idle = 0
    while len(done) < len(requests):
        while nxt < len(order) and requests[order[nxt]].arrival_s <= clock.now:
            i = order[nxt]
            r = requests[i]
            params = SamplingParams(temperature=0, max_tokens=r.output_tokens, ignore_eos=True)
            engine.add_request(EngineRequest.make(str(i), [TOKEN] * r.prompt_tokens, params))
            nxt += 1
        if not engine.has_unfinished():
            clock.now = requests[order[nxt]].arrival_s
            continue
        before = clock.now
        outputs = engine.step()
        failed = engine.take_failed()
        if failed:
            raise InternalError(f"the replay failed request {failed[0][0]}: {failed[0][1]}")
        for out in outputs:
            i = int(out.request_id)
            got[i] += len(out.outputs[0].token_ids)
            first.setdefault(i, clock.now)
            if out.finished:
                done[i] = clock.now
        idle = idle + 1 if clock.now == before else 0
        if idle and nxt < len(order):  # nothing could run: wait for the next arrival
            clock.now = max(clock.now, requests[order[nxt]].arrival_s)
        elif idle > MAX_IDLE_STEPS:
            raise InternalError(f"the {policy_name} scheduler stopped making progress in a replay")
    return _result(engine, requests, first, done, got)


def _result(
    engine: Engine,
    requests: Sequence[TraceRequest],
    first: dict[int, float],
    done: dict[int, float],
    got: list[int],
) -> ReplayResult:
    stats = engine.stats()
    counters = {name: int(getattr(stats, name)) for name in COUNTERS}
    counters["swap_bytes_out"] = stats.swap_bytes_out
    counters["swap_bytes_in"] = stats.swap_bytes_in
    start = min((r.arrival_s for r in requests), default=0.0)
    timings = [RequestTiming(r.arrival_s, first[i], done[i], got[i]) for i, r in enumerate(requests)]
    assert isinstance(engine.run_batch, CostRunner)
    iterations = engine.run_batch.iterations
    engine.close()
    return ReplayResult(timings, iterations, counters, max(done.values(), default=start) - start)


@dataclass(frozen=True)
class ReplayRunner:
    """`ember bench sched --cost-model FILE`: every case replayed on the cost model's
    clock (the `RunCase` beside the real-clock EngineRunner). Deterministic, so one
    repeat says what many real runs on a noisy machine only bracket."""

    base: EngineConfig
    cost: CostModel

    @classmethod
    def load(cls, path: str, options: dict[str, Any]) -> ReplayRunner:
        return cls(EngineConfig(**options), CostModel.load(path))

    @property
    def max_model_len(self) -> int:
        engine = replay_engine("fcfs", self.base, self.cost, VirtualClock())
        try:
            return engine.max_model_len
        finally:
            engine.close()

    def __call__(self, requests: Sequence[TraceRequest], case: Case) -> CaseResult:
        r = replay(requests, case.scheduler, case_config(self.base, case), self.cost)
        counters = {name.removeprefix("num_"): r.counters[name] for name in COUNTERS}
        return CaseResult(r.timings, r.iteration_s, counters, r.makespan_s)
