"""`ember bench cost`: fit the scheduling replay's CostModel to this machine.

The real engine (FCFS, default settings but a wide batch) runs a grid of request
mixes on the model: lone prefills of 8 to 3,000 tokens (the longest in chunks with
context), decode batches of 1 to 32 sequences at contexts of 16 to 2,048, and decode
batches that a prefill joins mid-way. Every iteration's wall time (the whole
`Engine.step()`: scheduling, forward, sampling, bookkeeping) is recorded with the
batch it computed; one iteration in five is held out, the model is fitted to the rest
and its relative error on the held-out ones is reported. The grid repeats, in the
same order, until `seconds` have passed (at least once). The swap bandwidth is timed
separately: KV blocks copied out of the cache and back.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ember.bench.sched_cost import CostModel, IterationSample
from ember.bench.workload import synthetic_prompt
from ember.engine.prefill_profile import PrefillProfile
from ember.errors import InvalidRequestError

Progress = Callable[[str, int, int], None]
HOLD_OUT_EVERY = 5  # every 5th timed iteration is kept out of the fit, to test it


@dataclass(frozen=True)
class Scenario:
    name: str
    requests: tuple[tuple[int, int, int], ...]  # (step it joins at, prompt tokens, output tokens)


def scenarios() -> list[Scenario]:
    """The grid of batch shapes, at most ~8k tokens of KV each (the default budget)."""
    out = [Scenario(f"prefill {n}", ((0, n, 3),)) for n in (8, 32, 96, 256, 512, 1024, 2048, 3000)]
    decodes = [(1, 16), (1, 512), (1, 2048), (2, 128), (4, 64), (4, 1024), (8, 32), (8, 256)]
    decodes += [(8, 1024), (16, 16), (16, 128), (16, 512), (32, 32), (32, 128), (32, 256)]
    out += [Scenario(f"decode {b}x{c}", tuple((0, c, 8) for _ in range(b))) for b, c in decodes]
    mixed = [(4, 64, 128), (4, 512, 1024), (16, 64, 256), (16, 256, 1024), (8, 128, 2048)]
    out += [
        Scenario(f"decode {b}x{c} + prefill {n}", (*((0, c, 12) for _ in range(b)), (3, n, 2)))
        for b, c, n in mixed
    ]
    return out


class _Recorder(PrefillProfile):
    """Keeps the last iteration's batch shape (the engine reports each one here)."""

    def __init__(self) -> None:
        super().__init__()
        self.last: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def observe(self, query_lens: Sequence[int], context_lens: Sequence[int], seconds: float) -> None:
        self.last = (tuple(query_lens), tuple(context_lens))


def run_scenario(engine: Any, scenario: Scenario, tag: str) -> list[IterationSample]:
    """Run the scenario's requests to completion; every iteration timed with its batch."""
    from ember.engine.request import EngineRequest, SamplingParams

    recorder = engine.profile
    assert isinstance(recorder, _Recorder)
    pending = sorted(scenario.requests)
    samples: list[IterationSample] = []
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt, output = pending.pop(0)
            params = SamplingParams(temperature=0, max_tokens=output, ignore_eos=True)
            rid = f"{tag}-{len(scenario.requests) - len(pending)}"
            engine.add_request(
                EngineRequest.make(rid, synthetic_prompt(step + prompt, prompt, engine.vocab_size), params)
            )
        recorder.last = None
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        if recorder.last is not None:
            samples.append(IterationSample(*recorder.last, seconds))
        step += 1
    return samples


def measure_swap_bandwidth(kv_cache: Any, num_blocks: int = 64, repeats: int = 5) -> float:
    """Bytes per second of KV blocks copied out to host memory and back (median)."""
    ids = list(range(min(num_blocks, kv_cache.num_blocks)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data = kv_cache.copy_blocks_out(ids)
        kv_cache.copy_blocks_in(ids, data)
        times.append(time.perf_counter() - start)
    return float(2 * len(ids) * kv_cache.block_bytes / statistics.median(times))


@dataclass(frozen=True)
class Calibration:
    cost: CostModel
    samples: int  # timed iterations in all
    passes: int  # times the grid ran
    seconds: float  # wall time spent


def calibrate(
    model: str,
    *,
    seconds: float = 300.0,
    grid: Sequence[Scenario] | None = None,
    progress: Progress | None = None,
) -> Calibration:
    """Time the grid on the real engine over `model` and fit the cost model."""
    from ember.engine.config import EngineConfig
    from ember.engine.loader import load_engine

    grid = list(grid if grid is not None else scenarios())
    config = EngineConfig(scheduler="fcfs", max_num_seqs=64, max_num_batched_tokens=2048)
    engine = load_engine(model, config)
    engine.profile = _Recorder()  # FCFS reads no profile: only the engine reports to it
    grid = [s for s in grid if _fits(s, engine.max_model_len, engine.blocks.capacity_tokens)]
    if not grid:
        raise InvalidRequestError(f"no calibration scenario fits {model}'s context", param="model")
    run_scenario(engine, Scenario("warm-up", ((0, 16, 2),)), "warm-up")
    start = time.perf_counter()
    samples: list[IterationSample] = []
    passes = 0
    while passes == 0 or time.perf_counter() - start < seconds:
        for i, scenario in enumerate(grid):
            if passes > 0 and time.perf_counter() - start >= seconds:
                break
            if progress is not None:
                progress(f"timing: {scenario.name}", i, len(grid))
            samples += run_scenario(engine, scenario, f"p{passes}-{i}")
        passes += 1
    bandwidth = measure_swap_bandwidth(engine.runner.kv_cache)
    spec = engine.runner.model.spec
    train = [s for i, s in enumerate(samples) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    test = [s for i, s in enumerate(samples) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    fitted = CostModel.fit(
        train,
        swap_bytes_per_s=bandwidth,
        kv_bytes_per_token=engine.runner.kv_cache.block_bytes // engine.runner.kv_cache.block_size,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        model=str(model),
    )
    elapsed = time.perf_counter() - start
    notes = {"threads": _threads(), "samples": len(samples), "held_out": len(test), "passes": passes}
    cost = dataclasses.replace(fitted, fit_error=fitted.errors(test), notes=notes)
    engine.close()
    return Calibration(cost, len(samples), passes, elapsed)


def _fits(scenario: Scenario, max_model_len: int, kv_tokens: int) -> bool:
    """Whether every request fits the model's context, and all of them the KV cache."""
    sizes = [prompt + output for _, prompt, output in scenario.requests]
    return max(sizes) <= max_model_len and sum(sizes) <= kv_tokens


def _threads() -> int:
    import torch

    return torch.get_num_threads()
