"""No error path leaves a request in flight. Whatever raises in admission (tokenising,
validation, the backend before its first delta), in the engine (scheduler, forward,
sampler, detokenizer) or while the response is built, the client gets an error in
OpenAI's shape, `ember:num_requests_running` and `ember:server_requests_in_flight`
come back to 0, and the next request succeeds. A failure of one request spares the
others of its batch; a failure of the whole step ends them all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.engine import async_engine
from ember.engine.async_engine import AsyncEngine
from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.request import EngineRequest, RequestOutput
from ember.server.app import create_app
from ember.server.in_flight import Slot, SlotStream
from tests.server.embedded_backend import EmbeddedBackend

pytestmark = pytest.mark.timeout(120)

PROMPT = "The capital of France is"
ADMISSION = ["tokenise", "validate", "generate"]
ENGINE = ["schedule", "forward", "sample", "detokenize"]


@pytest.fixture(scope="module")
def engine(tiny_llama: tuple[Path, Any]) -> Iterator[AsyncEngine]:
    e = AsyncEngine.from_checkpoint(tiny_llama[0], max_model_len=256, kv_cache_bytes=8 << 20)
    try:
        yield e
    finally:
        e.shutdown()


def once(fn: Callable[..., Any], at: int = 1) -> Callable[..., Any]:
    """`fn`, except that its `at`-th call raises RuntimeError instead."""
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            raise RuntimeError("injected failure")
        return fn(*args, **kwargs)

    return wrapper


def inject(
    point: str, engine: AsyncEngine, backend: EmbeddedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Make the function at `point` raise once: admission and response building at
    their first call, the engine at its third (the stream has begun)."""
    core = engine.engine
    if point == "tokenise":
        monkeypatch.setattr(core.tokenizer, "encode", once(core.tokenizer.encode))
    elif point == "validate":
        monkeypatch.setattr(async_engine, "validate_request", once(async_engine.validate_request))
    elif point == "generate":
        monkeypatch.setattr(backend, "generate", _failing_first(backend.generate))
    elif point == "schedule":
        monkeypatch.setattr(core.scheduler, "schedule", once(core.scheduler.schedule, at=3))
    elif point == "forward":
        monkeypatch.setattr(core.runner.model, "forward", once(core.runner.model.forward, at=3))
    elif point == "sample":
        monkeypatch.setattr(core.runner, "sampler", once(core.runner.sampler, at=3))
    elif point == "detokenize":
        monkeypatch.setattr(IncrementalDetokenizer, "append", once(IncrementalDetokenizer.append, at=3))
    else:
        assert point == "respond"
        monkeypatch.setattr("ember.server.responses._wants_logprobs", once(lambda choice: False))


def _failing_first(
    generate: Callable[[str, EngineRequest], AsyncIterator[RequestOutput]],
) -> Callable[[str, EngineRequest], AsyncIterator[RequestOutput]]:
    calls = [0]

    async def wrapper(model: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("injected failure")
        async for delta in generate(model, request):
            yield delta

    return wrapper


def body(prompt: str = PROMPT, stream: bool = False) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream}


def events(r: httpx.Response) -> list[Any]:
    """A stream's events, `[DONE]` as the string."""
    out = []
    for line in r.text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def text_of(r: httpx.Response, stream: bool) -> str:
    assert r.status_code == 200, r.text
    if not stream:
        return str(r.json()["choices"][0]["text"])
    return "".join(e["choices"][0]["text"] for e in events(r) if e != "[DONE]" and e["choices"])


async def gauges(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    names = ("num_requests_running", "kv_cache_usage_perc", "server_requests_in_flight")
    out = {}
    for name in names:
        match = re.search(rf"^ember:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        assert match is not None, name
        out[name] = float(match.group(1))
    return out


@contextlib.asynccontextmanager
async def serving(engine: AsyncEngine) -> AsyncIterator[tuple[httpx.AsyncClient, EmbeddedBackend]]:
    app = create_app()
    backend = EmbeddedBackend({"tiny": engine}, created=int(time.time()))
    app.state.ember.backend = backend
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ember") as client:
        yield client, backend


IDLE = {"num_requests_running": 0.0, "kv_cache_usage_perc": 0.0, "server_requests_in_flight": 0.0}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("point", [*ADMISSION, *ENGINE, "respond"])
def test_a_failure_anywhere_ends_the_request_and_leaves_nothing_in_flight(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, point: str, stream: bool
) -> None:
    async def main() -> None:
        async with serving(engine) as (client, backend):
            want = text_of(await client.post("/v1/completions", json=body(stream=stream)), stream)
            inject(point, engine, backend, monkeypatch)
            r = await client.post("/v1/completions", json=body(stream=stream))
            if stream and point not in ADMISSION:  # after the 200: an error event, then [DONE]
                assert r.status_code == 200
                *_, error, done = events(r)
                assert done == "[DONE]"
            else:
                assert r.status_code == 500
                error = r.json()
            assert error["error"]["type"] == "internal_error"
            assert "injected failure" in error["error"]["message"]
            assert await gauges(client) == IDLE
            again = await client.post("/v1/completions", json=body(stream=stream))
            assert text_of(again, stream) == want
            assert await gauges(client) == IDLE

    asyncio.run(main())


@contextlib.contextmanager
def held(engine: AsyncEngine) -> Iterator[threading.Event]:
    """Hold the engine thread between two iterations until the event is set: requests
    submitted meanwhile all join its next batch."""
    gate = threading.Event()
    engine._commands.put(lambda: gate.wait(60))
    try:
        yield gate
    finally:
        gate.set()


async def batched(
    engine: AsyncEngine, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, prompts: list[str]
) -> tuple[list[httpx.Response], dict[str, float]]:
    """The prompts' completions, all in one batch; the gauges while they waited."""
    submitted = asyncio.Event()
    submit = engine.submit

    def counted(request: EngineRequest) -> Any:
        stream = submit(request)
        if len(engine._streams) == len(prompts):
            submitted.set()
        return stream

    with held(engine) as gate:
        monkeypatch.setattr(engine, "submit", counted)
        tasks = [asyncio.create_task(client.post("/v1/completions", json=body(p))) for p in prompts]
        await submitted.wait()
        waiting = await gauges(client)
        gate.set()
        return [await t for t in tasks], waiting


def test_one_requests_failure_spares_the_others_of_its_batch(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing: set[int] = set()
    init, append = IncrementalDetokenizer.__init__, IncrementalDetokenizer.append

    def record(self: IncrementalDetokenizer, tokenizer: Any, prompt: Any, **kw: Any) -> None:
        init(self, tokenizer, prompt, **kw)
        if list(prompt) == engine.engine.tokenizer.encode("Boom"):
            failing.add(id(self))

    def fail_boom(self: IncrementalDetokenizer, token: int) -> str | None:
        if id(self) in failing:
            raise RuntimeError("injected failure")
        return append(self, token)

    async def main() -> None:
        async with serving(engine) as (client, _):
            want = text_of(await client.post("/v1/completions", json=body()), False)
            monkeypatch.setattr(IncrementalDetokenizer, "__init__", record)
            monkeypatch.setattr(IncrementalDetokenizer, "append", fail_boom)
            (boom, fine), waiting = await batched(engine, client, monkeypatch, ["Boom", PROMPT])
            assert waiting["server_requests_in_flight"] == 2
            assert boom.status_code == 500 and "injected failure" in boom.json()["error"]["message"]
            assert text_of(fine, False) == want
            assert failing and await gauges(client) == IDLE

    asyncio.run(main())


def test_a_failed_step_ends_every_request_of_its_batch_cleanly(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        async with serving(engine) as (client, _):
            want = text_of(await client.post("/v1/completions", json=body()), False)
            model = engine.engine.runner.model
            monkeypatch.setattr(model, "forward", once(model.forward))
            responses, _ = await batched(engine, client, monkeypatch, [PROMPT, "Boom"])
            assert [r.status_code for r in responses] == [500, 500]
            assert await gauges(client) == IDLE
            assert text_of(await client.post("/v1/completions", json=body()), False) == want

    asyncio.run(main())


def test_a_client_gone_before_the_first_byte_leaves_its_slot() -> None:
    # Starlette never starts the body of a stream whose client left first: the slot
    # must come back from the response itself, and the generation be closed.
    async def main() -> tuple[int, bool, bool]:
        count = [1]
        closed = asyncio.Event()
        started = False

        async def close() -> None:
            closed.set()

        async def body() -> AsyncIterator[str]:
            nonlocal started
            started = True
            yield "data: never\n\n"

        slot = Slot(lambda: count.__setitem__(0, count[0] - 1))
        slot.close = close

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            await asyncio.Event().wait()  # a client that reads nothing

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        await SlotStream(body(), slot)(scope, receive, send)
        return count[0], closed.is_set(), started

    assert asyncio.run(main()) == (0, True, False)


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**64])
def test_a_seed_outside_64_bits_is_a_400_naming_it(engine: AsyncEngine, seed: int) -> None:
    async def main() -> httpx.Response:
        async with serving(engine) as (client, _):
            r = await client.post("/v1/completions", json={**body(), "temperature": 0.8, "seed": seed})
            assert await gauges(client) == IDLE
            return r

    r = asyncio.run(main())
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed"


def test_the_largest_seed_with_several_choices_samples(engine: AsyncEngine) -> None:
    async def main() -> httpx.Response:
        async with serving(engine) as (client, _):
            seeded = {**body(), "temperature": 0.8, "seed": 2**63 - 1, "n": 2}
            return await client.post("/v1/completions", json=seeded)

    r = asyncio.run(main())
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
