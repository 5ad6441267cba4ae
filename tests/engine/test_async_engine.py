"""AsyncEngine on the fake paged model: concurrent streams, bad requests, abort, resume."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.engine.async_engine import AsyncEngine, RequestStream
from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.loader import load_engine
from ember.engine.request import EngineRequest, SamplingParams
from ember.errors import ContextLengthError, EmberError, InvalidRequestError
from tests.engine.fakes import FakeKVCache, FakeModel, reference_greedy

pytestmark = pytest.mark.timeout(60)
GREEDY = SamplingParams(temperature=0, max_tokens=10)


@pytest.fixture
def engine() -> Iterator[AsyncEngine]:
    config = EngineConfig(device="cpu", block_size=4, max_model_len=128)
    e = AsyncEngine(Engine(FakeModel(), FakeKVCache(64, 4), config))
    try:
        yield e
    finally:
        e.shutdown()


class GatedModel(FakeModel):
    """Runs only as many forward passes as the test has allowed."""

    def __init__(self, allowed: int) -> None:
        super().__init__()
        self.allowed = allowed
        self.started = 0
        self.gate = threading.Semaphore(allowed)
        self.waiting = threading.Event()  # set when a forward pass waits at the gate

    def forward(self, *args: Any) -> Any:
        self.started += 1
        if self.started > self.allowed:
            self.waiting.set()
        assert self.gate.acquire(timeout=30)
        return super().forward(*args)


def command_queued(engine: AsyncEngine) -> threading.Event:
    """An event set once a command (an abort, a shutdown's stop) is next queued for the
    engine thread: what a caller does at once, before it waits for the answer."""
    queued = threading.Event()
    put = engine._commands.put

    def put_and_signal(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        queued.set()

    engine._commands.put = put_and_signal  # type: ignore[method-assign]
    return queued


async def collect(stream: RequestStream) -> list[int]:
    tokens = []
    async for out in stream:
        tokens += out.outputs[0].token_ids
    return tokens


def test_one_bad_request_among_good_ones(engine: AsyncEngine) -> None:
    prompts = [[1, 2, 3], list(range(5, 30)), [9]]

    async def main() -> list[list[int]]:
        streams = [engine.submit(EngineRequest.make(f"g{i}", p, GREEDY)) for i, p in enumerate(prompts[:2])]
        with pytest.raises(ContextLengthError):
            engine.submit(EngineRequest.make("bad", [1] * 200, GREEDY))
        with pytest.raises(InvalidRequestError, match="vocabulary"):
            engine.submit(EngineRequest.make("bad2", [1, 10_000], GREEDY))
        with pytest.raises(InvalidRequestError, match="already running"):
            engine.submit(EngineRequest.make("g0", [1], GREEDY))
        streams.append(engine.submit(EngineRequest.make("g2", prompts[2], GREEDY)))
        return list(await asyncio.gather(*(collect(s) for s in streams)))

    assert asyncio.run(main()) == [reference_greedy(p, 10) for p in prompts]


def test_abort_ends_the_stream_and_resume_continues_elsewhere() -> None:
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=40)
    config = EngineConfig(device="cpu", block_size=4)
    expected = Engine(FakeModel(), FakeKVCache(64, 4), config)
    expected.add_request(EngineRequest.make("x", [4, 5, 6], params))
    full: list[int] = []
    while expected.has_unfinished():
        full += [t for o in expected.step() for t in o.outputs[0].token_ids]

    model = GatedModel(allowed=4)
    source = AsyncEngine(Engine(model, FakeKVCache(64, 4), config))
    destination = AsyncEngine(Engine(FakeModel(), FakeKVCache(64, 4), config))

    async def main() -> list[int]:
        stream = source.submit(EngineRequest.make("x", [4, 5, 6], params))
        seen = [await anext(stream) for _ in range(4)]
        assert await asyncio.to_thread(model.waiting.wait, 30)
        queued = command_queued(source)
        abort = asyncio.create_task(source.abort("x"))
        assert await asyncio.to_thread(queued.wait, 30)  # queued while the 5th step waits at the gate
        model.gate.release()
        snapshot = await abort
        fifth, last = await anext(stream), await anext(stream)
        assert not fifth.finished and last.finished and last.outputs[0].finish_reason == "abort"
        assert snapshot is not None
        streamed = [t for o in [*seen, fifth] for t in o.outputs[0].token_ids]
        assert list(snapshot.output_token_ids) == streamed
        assert source.engine.blocks.num_free_blocks == source.engine.blocks.num_blocks
        rest = await collect(
            destination.resume(
                snapshot.prompt_token_ids,
                snapshot.output_token_ids,
                snapshot.sampling_params,
                snapshot.sampler_state,
            )
        )
        return streamed + rest

    try:
        assert asyncio.run(main()) == full
    finally:
        source.shutdown()
        destination.shutdown()


def test_abort_of_an_unknown_request_is_none(engine: AsyncEngine) -> None:
    assert asyncio.run(engine.abort("nobody")) is None


def test_streamed_text_concatenates_and_resume_continues_on_the_tiny_llama(
    tiny_llama: tuple[Path, Any],
) -> None:
    path = str(tiny_llama[0])
    source = AsyncEngine.from_checkpoint(path, device="cpu")
    destination = AsyncEngine.from_checkpoint(path, device="cpu")
    tok = source.engine.tokenizer
    assert tok is not None
    prompt = tok.encode("日本語のテキスト 🙂 and")
    params = SamplingParams(temperature=1.0, seed=4, max_tokens=24, ignore_eos=True)

    async def stream_all(stream: RequestStream) -> tuple[str, list[int]]:
        text, ids = "", []
        async for out in stream:
            text += out.outputs[0].text
            ids += out.outputs[0].token_ids
        return text, ids

    async def main() -> None:
        text, ids = await stream_all(source.submit(EngineRequest.make("full", prompt, params)))
        assert text == tok.decode(ids, skip_special_tokens=True)
        # one bad request among good ones; the good ones are served
        good = [source.submit(EngineRequest.make(f"g{i}", prompt, params)) for i in range(2)]
        with pytest.raises(ContextLengthError):
            source.submit(EngineRequest.make("bad", [5] * 5000, params))
        assert [r[1] for r in await asyncio.gather(*(stream_all(g) for g in good))] == [ids, ids]
        # migration by tokens: stop a copy after 10 tokens, move tokens + sampler state elsewhere
        paused = load_engine(path, EngineConfig(device="cpu"))
        paused.add_request(EngineRequest.make("m", prompt, params))
        seen: list[int] = []
        seen_text = ""
        while len(seen) < 10:
            for o in paused.step():
                seen += o.outputs[0].token_ids
                seen_text += o.outputs[0].text
        aborted = paused.abort("m")
        assert aborted is not None
        snapshot = aborted[1]
        rest_text, rest = await stream_all(
            destination.resume(
                snapshot.prompt_token_ids, snapshot.output_token_ids, params, snapshot.sampler_state
            )
        )
        assert seen + rest == ids
        assert seen_text + rest_text == text  # no character lost or repeated at the handover

    try:
        asyncio.run(main())
    finally:
        source.shutdown()
        destination.shutdown()


def test_abort_whose_caller_gave_up_still_aborts_and_engine_keeps_serving() -> None:
    config = EngineConfig(device="cpu", block_size=4, max_model_len=128)
    model = GatedModel(allowed=1)
    engine = AsyncEngine(Engine(model, FakeKVCache(64, 4), config))
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def run() -> list[int]:
        stream = engine.submit(EngineRequest.make("gone", [1, 2, 3], long))
        await stream.__anext__()
        assert await asyncio.to_thread(model.waiting.wait, 30)  # the thread holds in its 2nd forward
        queued = command_queued(engine)
        waiter = asyncio.create_task(engine.abort("gone"))
        assert await asyncio.to_thread(queued.wait, 30)  # the abort is queued, not yet run
        waiter.cancel()  # e.g. the HTTP client disconnected while the abort was queued
        await asyncio.gather(waiter, return_exceptions=True)
        model.gate.release(1000)  # every forward from now on runs
        return await collect(engine.submit(EngineRequest.make("next", [4, 5, 6], GREEDY)))

    try:
        tokens = asyncio.run(run())
        assert tokens == reference_greedy([4, 5, 6], 10)
        assert engine.engine.num_running == 0 and engine.engine.blocks.usage == 0.0
    finally:
        engine.shutdown()


def test_prewarm_parks_the_cache_and_a_resume_continues_from_it(engine: AsyncEngine) -> None:
    prompt = list(range(3, 20))
    full = reference_greedy(prompt, 10)

    async def main() -> list[int]:
        assert await engine.prewarm(EngineRequest.make("m", prompt, GREEDY, output_token_ids=full[:2])) == 19
        cached = await engine.prewarm(EngineRequest.make("m", prompt, GREEDY, output_token_ids=full[:5]))
        assert cached == 22 and engine.engine.num_parked == 1
        with pytest.raises(InvalidRequestError, match="vocabulary"):
            await engine.prewarm(EngineRequest.make("bad", [500], GREEDY))
        rest = await collect(engine.resume(prompt, full[:6], GREEDY, request_id="m"))
        assert await engine.prewarm(EngineRequest.make("gone", prompt, GREEDY)) == 17
        assert await engine.abort("gone") is None  # an abort frees a parked cache
        return rest

    assert asyncio.run(main()) == full[6:]
    assert engine.engine.num_parked == 0
    assert engine.engine.blocks.num_free_blocks == engine.engine.blocks.num_blocks


def test_a_stream_ended_by_shutdown_closes_without_hanging() -> None:
    # A node stops an instance while a client still reads from it: the stream ends with
    # an error, and its clean-up (an abort, which needs the engine thread) still returns.
    config = EngineConfig(device="cpu", block_size=4, max_model_len=128)
    model = GatedModel(allowed=1)
    engine = AsyncEngine(Engine(model, FakeKVCache(64, 4), config))
    long = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def run() -> None:
        stream = engine.generate(EngineRequest.make("r", [1, 2, 3], long))
        await anext(stream)
        assert await asyncio.to_thread(model.waiting.wait, 30)  # the thread is inside its next forward
        queued = command_queued(engine)
        stopping = asyncio.create_task(asyncio.to_thread(engine.shutdown))
        assert await asyncio.to_thread(queued.wait, 30)  # the stop is queued behind that forward
        model.gate.release()  # the forward returns; the thread sees the stop
        with pytest.raises(EmberError, match="shut down"):
            while True:  # the token of the forward that was running, then the error
                await anext(stream)
        await stopping
        await stream.aclose()
        assert await engine.abort("r") is None  # after shutdown: an answer, not a hang
        with pytest.raises(EmberError, match="shut down"):
            engine.submit(EngineRequest.make("late", [1], GREEDY))

    asyncio.run(asyncio.wait_for(run(), 30))
