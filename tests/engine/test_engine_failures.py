"""No error leaves a request in flight: what an iteration's error ends (one request, the
batch, every request), a request that fails while it joins, a seed outside 64 bits, and
an engine thread that dies. The engine serves on with its KV blocks all free."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.engine.async_engine import AsyncEngine
from ember.engine.config import EngineConfig
from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.engine import Engine
from ember.engine.llm import LLM
from ember.engine.request import EngineRequest, SamplingParams
from ember.engine.sampler import new_generator
from ember.errors import EngineDeadError, InternalError, InvalidRequestError
from tests.engine.fakes import FakeKVCache, FakeModel, reference_greedy

pytestmark = pytest.mark.timeout(60)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
A, B = [1, 2, 3], [4, 5, 6, 7]


def once(fn: Callable[..., Any], at: int = 1, error: Exception | None = None) -> Callable[..., Any]:
    """`fn`, except that its `at`-th call raises `error` (a RuntimeError) instead."""
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            raise error or RuntimeError("injected failure")
        return fn(*args, **kwargs)

    return wrapper


def make_engine(tokenizer: Any = None) -> Engine:
    config = EngineConfig(device="cpu", block_size=4, max_model_len=128)
    return Engine(FakeModel(), FakeKVCache(64, 4), config, tokenizer=tokenizer)


def run_all(engine: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return tokens


def assert_clean(engine: Engine) -> None:
    """Nothing left in flight: no request, no KV block held."""
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    assert not engine.has_unfinished()


def add(engine: Engine, *requests: tuple[str, list[int]]) -> None:
    for rid, prompt in requests:
        engine.add_request(EngineRequest.make(rid, prompt, GREEDY))


def test_one_requests_detokenizer_failing_ends_it_alone(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(tokenizer)
    failing: set[int] = set()
    init, append = IncrementalDetokenizer.__init__, IncrementalDetokenizer.append

    def record(self: IncrementalDetokenizer, tok: Any, prompt: Any, **kw: Any) -> None:
        init(self, tok, prompt, **kw)
        if list(prompt) == A:
            failing.add(id(self))

    def fail_a(self: IncrementalDetokenizer, token: int) -> str | None:
        if id(self) in failing:
            raise RuntimeError("injected detokenizer failure")
        return append(self, token)

    monkeypatch.setattr(IncrementalDetokenizer, "__init__", record)
    monkeypatch.setattr(IncrementalDetokenizer, "append", fail_a)
    add(engine, ("a", A), ("b", B))
    outputs = engine.step()  # one batch: both prefills
    assert [o.request_id for o in outputs] == ["b"]
    [(rid, error)] = engine.take_failed()
    assert rid == "a" and isinstance(error, InternalError) and "detokenizer" in str(error)
    rest = run_all(engine)
    assert outputs[0].outputs[0].token_ids + rest["b"] == reference_greedy(B, 6)
    assert_clean(engine)


@pytest.mark.parametrize("point", ["forward", "sampler", "scheduler"])
def test_a_step_failing_ends_its_batch_and_the_engine_serves_on(
    point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine()
    if point == "forward":
        monkeypatch.setattr(engine.runner.model, "forward", once(engine.runner.model.forward, at=2))
    elif point == "sampler":
        monkeypatch.setattr(engine.runner, "sampler", once(engine.runner.sampler, at=2))
    else:
        monkeypatch.setattr(engine.scheduler, "schedule", once(engine.scheduler.schedule, at=2))
    add(engine, ("a", A), ("b", B))
    engine.step()  # both prefills, a token each
    assert engine.step() == []
    failed = engine.take_failed()
    assert sorted(rid for rid, _ in failed) == ["a", "b"]
    assert all(isinstance(e, InternalError) and "injected failure" in str(e) for _, e in failed)
    assert_clean(engine)
    add(engine, ("c", A))
    assert run_all(engine) == {"c": reference_greedy(A, 6)}
    assert engine.take_failed() == []


def test_a_forward_failure_spares_the_requests_outside_its_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EngineConfig(device="cpu", block_size=4, max_model_len=128, max_num_seqs=1, scheduler="fcfs")
    engine = Engine(FakeModel(), FakeKVCache(64, 4), config)
    monkeypatch.setattr(engine.runner.model, "forward", once(engine.runner.model.forward))
    add(engine, ("a", A), ("b", B))  # one sequence per batch: b waits
    assert engine.step() == []
    assert [rid for rid, _ in engine.take_failed()] == ["a"]
    assert run_all(engine) == {"b": reference_greedy(B, 6)}
    assert_clean(engine)


def test_a_request_that_fails_while_joining_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine()
    engine.add_request(EngineRequest.make("a", A, GREEDY, park=True))
    engine.step()  # parks a's cache
    assert engine.num_parked == 1 and engine.stats().kv_cache_usage > 0
    monkeypatch.setattr(engine.scheduler, "add", once(engine.scheduler.add))
    with pytest.raises(RuntimeError, match="injected"):
        engine.add_request(EngineRequest.make("a", A, GREEDY))  # takes over the parked cache, then fails
    assert engine.num_parked == 0
    assert_clean(engine)
    add(engine, ("a", A))
    assert run_all(engine) == {"a": reference_greedy(A, 6)}


def test_llm_generate_raises_the_failure_and_frees_every_block(
    tiny_llama: tuple[Path, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLM(tiny_llama[0], max_model_len=128, kv_cache_bytes=4 << 20)
    prompts = [{"prompt_token_ids": A}, {"prompt_token_ids": B}]
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    model = llm.engine.runner.model
    monkeypatch.setattr(model, "forward", once(model.forward, at=3))
    with pytest.raises(InternalError, match="injected"):
        llm.generate(prompts, GREEDY)
    assert_clean(llm.engine)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == want


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**64])
def test_a_seed_outside_64_bits_is_refused_at_once(seed: int) -> None:
    with pytest.raises(InvalidRequestError, match="64 bits") as exc:
        SamplingParams(temperature=0.7, seed=seed)
    assert exc.value.param == "seed"
    params = SamplingParams(temperature=0.7, seed=1)
    object.__setattr__(params, "seed", seed)  # past __post_init__, as an unpickled message could be
    engine = AsyncEngine(make_engine())
    try:

        async def submit() -> None:
            engine.submit(EngineRequest.make("x", A, params))

        with pytest.raises(InvalidRequestError, match="seed") as exc:
            asyncio.run(submit())
        assert exc.value.param == "seed"
    finally:
        engine.shutdown()


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
def test_seeds_at_the_ends_of_the_range_sample(seed: int) -> None:
    engine = make_engine()
    engine.add_request(EngineRequest.make("x", A, SamplingParams(temperature=0.7, seed=seed, max_tokens=3)))
    assert len(run_all(engine)["x"]) == 3


# -- the engine thread ------------------------------------------------------------------


@pytest.fixture
def async_engine() -> Iterator[AsyncEngine]:
    e = AsyncEngine(make_engine())
    try:
        yield e
    finally:
        e.shutdown()


async def tokens_of(engine: AsyncEngine, rid: str, prompt: list[int]) -> list[int]:
    out: list[int] = []
    async for delta in engine.generate(EngineRequest.make(rid, prompt, GREEDY)):
        out += delta.outputs[0].token_ids
    return out


def test_an_error_while_joining_ends_the_stream_not_in_a_hang(
    async_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a seed torch cannot take did before it was checked: the generator raised on
    # the engine thread, and the request waited for ever.
    overflow = OverflowError("Overflow when unpacking long long")
    monkeypatch.setattr("ember.engine.engine.new_generator", once(new_generator, error=overflow))

    async def main() -> list[int]:
        with pytest.raises(InternalError, match="admitting this request.*Overflow"):
            await tokens_of(async_engine, "x", A)
        return await tokens_of(async_engine, "y", A)

    assert asyncio.run(main()) == reference_greedy(A, 6)
    assert async_engine.engine.stats().kv_cache_usage == 0.0


def test_a_failing_step_ends_its_streams_and_the_thread_serves_on(
    async_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = async_engine.engine.runner.model
    monkeypatch.setattr(model, "forward", once(model.forward, at=3))

    async def main() -> list[int]:
        with pytest.raises(InternalError, match="injected"):
            await tokens_of(async_engine, "x", A)
        return await tokens_of(async_engine, "y", B)

    assert asyncio.run(main()) == reference_greedy(B, 6)


def test_a_dead_engine_thread_ends_every_request_and_refuses_new_ones(async_engine: AsyncEngine) -> None:
    # An error the engine could not contain: its step itself raises.
    step = async_engine.engine.step
    released = threading.Event()

    def broken_step() -> Any:
        released.wait(30)
        raise RuntimeError("corrupt engine state")

    async_engine.engine.step = broken_step  # type: ignore[method-assign]

    async def main() -> None:
        streams = [async_engine.submit(EngineRequest.make(r, A, GREEDY)) for r in ("x", "y")]
        released.set()
        for stream in streams:
            with pytest.raises(EngineDeadError, match="corrupt engine state"):
                async for _ in stream:
                    pass
        with pytest.raises(EngineDeadError) as refused:
            async_engine.submit(EngineRequest.make("z", A, GREEDY))
        assert refused.value.status == 503
        assert await async_engine.abort("x") is None

    asyncio.run(main())
    assert isinstance(async_engine.failure, EngineDeadError)
    async_engine.engine.step = step  # type: ignore[method-assign]
    async_engine.shutdown()  # returns, though the thread is gone
