"""Every policy and swap mode on the engine: a job preempted, swapped out and back in,
or recomputed, any number of times, produces exactly the tokens it would alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.options import SWAP_MODES
from ember.engine.output_lengths import OutputLengths
from ember.engine.policies import POLICIES, POLICY_NAMES
from ember.engine.request import EngineRequest, EngineStats, SamplingParams
from ember.errors import InvalidRequestError
from tests.engine.fakes import FakeKVCache, FakeModel, reference_greedy


class TickClock:
    """Advances 10 ms each time it is read: scheduling decisions repeat run to run."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


def heavy_tailed_lengths() -> OutputLengths:
    """Learnt from jobs four in five 1-2 tokens long, the rest 40: a job past 2 tokens
    ranks below a new one, so gittins preempts as often as least-attained-service."""
    lengths = OutputLengths.prior()
    for i in range(100):
        lengths.observe(40 if i % 5 == 0 else 1 + i % 2)
    return lengths


def fake_engine(num_blocks: int, block_size: int = 4, **cfg: Any) -> Engine:
    cfg.setdefault("mlfq_base_quantum_s", 0.02)
    config = EngineConfig(device="cpu", block_size=block_size, **cfg)
    return Engine(
        FakeModel(),
        FakeKVCache(num_blocks, block_size),
        config,
        eos_token_ids=[],
        clock=TickClock(),
        lengths=heavy_tailed_lengths(),
    )


def replay(e: Engine, arrivals: list[tuple[int, EngineRequest]]) -> dict[str, list[int]]:
    """Add each request at its step number; run until all finish; tokens per request."""
    pending = sorted(arrivals, key=lambda a: a[0])
    tokens: dict[str, list[int]] = {r.request_id: [] for _, r in arrivals}
    step = 0
    while pending or e.has_unfinished():
        while pending and pending[0][0] <= step:
            e.add_request(pending.pop(0)[1])
        for out in e.step():
            tokens[out.request_id].extend(out.outputs[0].token_ids)
        step += 1
        assert step < 5000, "the engine stopped making progress"
    e.close()
    return tokens


def solo(request: EngineRequest) -> list[int]:
    return replay(fake_engine(256, scheduler="fcfs"), [(0, request)])[request.request_id]


GREEDY = SamplingParams(temperature=0, max_tokens=14)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=11, max_tokens=14)
ROOMY = 64 * 32  # host space for 64 blocks: all the jobs' KV at once
PROMPTS = [list(range(1, 40)), [5, 6, 7], list(range(10, 33)), [42, 43], list(range(3, 20)), [9] * 11]


def workload(params: SamplingParams) -> list[tuple[int, EngineRequest]]:
    return [(2 * i, EngineRequest.make(f"r{i}", p, params)) for i, p in enumerate(PROMPTS)]


def policy_and_swap_cases() -> list[tuple[str, str, int | None]]:
    """(scheduler, swap, swap_bytes) for every registered policy: each mode of a policy
    that swaps, with the default host space, room for everything and room for 6 blocks
    (swapping and recomputing mix); recomputation alone for one that does not."""
    cases: list[tuple[str, str, int | None]] = []
    for name in POLICY_NAMES:
        if POLICIES[name].swaps:
            cases += [(name, "proactive", None), (name, "proactive", ROOMY), (name, "reactive", None)]
            cases += [(name, "off", None), (name, "proactive", 6 * 32)]
        else:
            cases.append((name, "off", None))
    return cases


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize(("scheduler", "swap", "swap_bytes"), policy_and_swap_cases())
def test_tokens_equal_the_solo_run_under_every_policy_and_swap_mode(
    params: SamplingParams, scheduler: str, swap: str, swap_bytes: int | None
) -> None:
    expected = {r.request_id: solo(r) for _, r in workload(params)}
    if params.greedy:
        assert expected == {f"r{i}": reference_greedy(p, 14) for i, p in enumerate(PROMPTS)}
    e = fake_engine(20, scheduler=scheduler, swap=swap, swap_bytes=swap_bytes, max_num_seqs=3)
    assert replay(e, workload(params)) == expected
    stats = e.stats()
    assert stats.num_preemptions > 0
    if swap == "off" or not POLICIES[scheduler].swaps:
        assert stats.num_swaps_out == 0 and stats.num_recomputations > 0
    else:
        assert stats.num_swaps_out > 0 and stats.num_swaps_in > 0
        assert stats.swap_bytes_out >= stats.swap_bytes_in > 0
    if swap_bytes == ROOMY:
        assert stats.num_recomputations == 0  # host space for everything: nothing recomputed


def test_stats_report_load_and_memory() -> None:
    e = fake_engine(64)
    assert e.stats() == EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0)
    e.add_request(EngineRequest.make("a", [1, 2, 3, 4, 5], GREEDY))
    e.add_request(EngineRequest.make("b", [1, 2], GREEDY))
    e.step()
    s = e.stats()
    assert (s.num_running, s.num_waiting) == (2, 0)
    assert s.kv_cache_usage == pytest.approx(3 / 64)


def test_bad_swap_settings_are_clear_errors() -> None:
    with pytest.raises(InvalidRequestError, match="swap mode"):
        EngineConfig(swap="sometimes")
    with pytest.raises(InvalidRequestError, match="mlfq_base_quantum_s"):
        EngineConfig(mlfq_base_quantum_s=0)
    assert EngineConfig().scheduler == "gittins" and EngineConfig().swap == "proactive"


request_shapes = st.tuples(
    st.integers(0, 12),  # arrival step
    st.integers(1, 30),  # prompt length
    st.integers(1, 12),  # max_tokens
    st.booleans(),  # seeded sampling instead of greedy
)


@pytest.mark.parametrize("scheduler", POLICY_NAMES)  # every registered policy
@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    shapes=st.lists(request_shapes, min_size=1, max_size=7),
    num_blocks=st.integers(11, 40),
    host_blocks=st.sampled_from([0, 4, 16, None]),
    swap=st.sampled_from(SWAP_MODES),
    max_num_seqs=st.integers(1, 4),
    max_num_batched_tokens=st.integers(4, 48),
)
def test_any_arrivals_and_budgets_keep_every_requests_tokens(
    scheduler: str,
    shapes: list[tuple[int, int, int, bool]],
    num_blocks: int,
    host_blocks: int | None,
    swap: str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> None:
    arrivals = []
    for i, (step, prompt_len, max_tokens, seeded) in enumerate(shapes):
        prompt = [(7 * i + 3 * j) % 90 + 1 for j in range(prompt_len)]
        params = SamplingParams(temperature=0.9, seed=i, max_tokens=max_tokens) if seeded else GREEDY
        arrivals.append(
            (
                step,
                EngineRequest.make(
                    f"q{i}", prompt, SamplingParams(**{**vars(params), "max_tokens": max_tokens})
                ),
            )
        )
    expected = {r.request_id: solo(r) for _, r in arrivals}
    e = fake_engine(
        num_blocks,
        scheduler=scheduler,
        swap=swap,
        swap_bytes=None if host_blocks is None else host_blocks * 32,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    assert replay(e, arrivals) == expected
    assert e.blocks.num_free_blocks == num_blocks  # nothing leaked


TINY_PROMPTS = [list(range(100, 100 + n)) for n in (30, 5, 17, 9)]
TINY_PARAMS = [
    SamplingParams(temperature=0, max_tokens=12),
    SamplingParams(temperature=0.9, seed=3, max_tokens=12),
]
TINY_REQUESTS = [
    EngineRequest.make(f"t{i}-{j}", pr, p)
    for i, pr in enumerate(TINY_PROMPTS)
    for j, p in enumerate(TINY_PARAMS)
]


def tiny_engine(path: Path, **cfg: Any) -> Engine:
    from ember.engine.loader import load_engine

    config = EngineConfig(device="cpu", block_size=4, mlfq_base_quantum_s=0.02, **cfg)
    return load_engine(path, config, clock=TickClock())


@pytest.fixture(scope="module")
def tiny_alone(tiny_llama: tuple[Path, Any]) -> dict[str, list[int]]:
    """Each request's tokens when it runs alone (one sequence at a time, ample KV)."""
    e = tiny_engine(tiny_llama[0], scheduler="fcfs", max_num_seqs=1)
    return replay(e, [(0, r) for r in TINY_REQUESTS])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("scheduler", "swap"),
    [("mlfq", "proactive"), ("mlfq", "reactive"), ("mlfq", "off"), ("gittins", "proactive")],
)
def test_the_tiny_llama_resumes_exactly_after_swaps(
    tiny_llama: tuple[Path, Any], tiny_alone: dict[str, list[int]], scheduler: str, swap: str
) -> None:
    e = tiny_engine(
        tiny_llama[0],
        scheduler=scheduler,
        swap=swap,
        max_num_seqs=3,
        kv_cache_bytes=14 * 4 * 2 * 2 * 2 * 16 * 8,
    )
    assert e.blocks.num_blocks == 14
    assert replay(e, [(i, r) for i, r in enumerate(TINY_REQUESTS)]) == tiny_alone
    stats = e.stats()
    assert stats.num_preemptions > 0
    assert (stats.num_swaps_in > 0) == (swap != "off")
