"""The real-clock `RunCase` of `ember bench sched`: each case gets a fresh engine over
the same weights and replays the requests in real time.

Requests are token-id prompts of the trace's lengths with ignore_eos, so every output
has the trace's length; each arrives when the wall clock passes its arrival time. The
engine of a case is built in `build_case_engine` alone: a policy with learnt state
that must start fresh per run resets it there, and every case starts from the same
copy of the model's iteration-time profile (the one saved under EMBER_HOME, warmed
by the probe), so no case learns from the ones before it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.bench.sched_cases import Case, CaseResult, RequestTiming
from ember.bench.workload import TraceRequest, synthetic_prompt

if TYPE_CHECKING:
    import torch

    from ember.engine.config import EngineConfig
    from ember.engine.engine import Engine
    from ember.engine.prefill_profile import PrefillProfile


@dataclass
class EngineRunner:
    """Runs cases on real engines: `checkpoint`, the shared `base` config and the
    weights loaded once for every case."""

    checkpoint: Path
    base: EngineConfig
    weights: Mapping[str, torch.Tensor]
    max_model_len: int  # what every case's engine serves: requests are cut to fit
    profile: PrefillProfile | None = None  # each case's engine starts from a copy of it

    @classmethod
    def load(cls, model: str, options: Mapping[str, Any]) -> EngineRunner:
        """Resolve the checkpoint, check the options (EngineConfig), load the weights."""
        from ember.engine.config import EngineConfig
        from ember.engine.loader import resolve_checkpoint
        from ember.store import load_tensors

        checkpoint = resolve_checkpoint(model)
        base = EngineConfig(**options)
        weights = load_tensors(checkpoint, device=base.torch_device)
        runner = cls(checkpoint, base, weights, 0)
        probe = runner.build_case_engine(Case("probe", "fcfs"))
        runner.max_model_len = probe.max_model_len
        probe.close()
        runner.profile = probe.profile.copy()
        return runner

    def config(self, case: Case) -> EngineConfig:
        return case_config(self.base, case)

    def build_case_engine(self, case: Case) -> Engine:
        """A fresh engine for one case, warmed up. The one place a case's engine is made."""
        from ember.engine.loader import load_engine
        from ember.engine.output_lengths import OutputLengths

        # every case learns output lengths from the prior, in memory: nothing carries over
        lengths = OutputLengths.prior()
        profile = self.profile.copy() if self.profile is not None else None
        engine = load_engine(
            self.checkpoint, self.config(case), weights=self.weights, lengths=lengths, profile=profile
        )
        _warm_up(engine)
        return engine

    def __call__(self, requests: Sequence[TraceRequest], case: Case) -> CaseResult:
        engine = self.build_case_engine(case)
        try:
            return replay(engine, requests)
        finally:
            engine.close()


def replay(engine: Engine, requests: Sequence[TraceRequest]) -> CaseResult:
    """Replay the requests (sorted by arrival) against the engine in real time."""
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
    iterations: list[float] = []
    nxt = 0
    start = time.monotonic()
    while len(done) < len(requests):
        now = time.monotonic() - start
        while nxt < len(pending) and requests[nxt].arrival_s <= now:
            engine.add_request(pending[nxt])
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(requests[nxt].arrival_s - now, 0.05)))  # idle until the next arrival
            continue
        began = time.monotonic()
        outputs = engine.step()
        ended = time.monotonic()
        iterations.append(ended - began)  # scheduling, forward, sampling: the whole iteration
        end = ended - start
        for out in outputs:
            rid = out.request_id
            got[rid] = got.get(rid, 0) + len(out.outputs[0].token_ids)
            first.setdefault(rid, end)
            if out.finished:
                done[rid] = end
    s = engine.stats()
    counters = {
        "preemptions": s.num_preemptions,
        "swaps_out": s.num_swaps_out,
        "swaps_in": s.num_swaps_in,
        "recomputations": s.num_recomputations,
    }
    timings = [RequestTiming(arrival[r], first[r], done[r], got[r]) for r in done]
    return CaseResult(timings, iterations, counters, max(done.values()) - requests[0].arrival_s)


def _warm_up(engine: Engine) -> None:
    """One short request, so first-iteration costs (thread pools, allocations) are not timed."""
    from ember.engine.request import EngineRequest, SamplingParams

    engine.add_request(
        EngineRequest.make(
            "warm-up", synthetic_prompt(-1, 8, engine.vocab_size), SamplingParams(max_tokens=2)
        )
    )
    while engine.has_unfinished():
        engine.step()


def case_config(base: EngineConfig, case: Case) -> EngineConfig:
    """The shared config with the case's policy, swap mode and token budget."""
    changes: dict[str, Any] = {"scheduler": case.scheduler}
    if case.swap is not None:
        changes["swap"] = case.swap
    if case.max_num_batched_tokens is not None:
        changes["max_num_batched_tokens"] = case.max_num_batched_tokens
    return base.replace(**changes)
