"""The in-flight limit (503 + Retry-After) and `ember.toml` settings, without a model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.backend import ModelInfo
from ember.engine.request import CompletionOutput, EngineRequest, EngineStats, RequestOutput
from ember.errors import InvalidRequestError
from ember.server.app import create_app
from ember.server.settings import load_settings

pytestmark = pytest.mark.timeout(60)


class GatedBackend:
    """Answers one token per request, but only once `gate` is set; `two_waiting` is set
    once two requests wait at the gate."""

    def __init__(self, tokenizer: Any) -> None:
        self.info = ModelInfo("m", tokenizer, 128, 0)
        self.gate = asyncio.Event()
        self.two_waiting = asyncio.Event()
        self.started = 0

    def models(self) -> list[ModelInfo]:
        return [self.info]

    def model(self, name: str) -> ModelInfo:
        return self.info

    async def generate(self, model: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        self.started += 1
        if self.started == 2:
            self.two_waiting.set()
        await self.gate.wait()
        out = CompletionOutput(0, "x", [5], "length")
        yield RequestOutput(request.request_id, None, list(request.prompt_token_ids), [out], True)

    def gauges(self) -> dict[str, EngineStats]:
        return {}

    async def close(self) -> None:
        pass


def test_requests_past_the_in_flight_limit_get_503_with_retry_after(tokenizer: Any) -> None:
    async def run() -> tuple[list[int], str | None, int]:
        app = create_app(max_in_flight=2)
        backend = GatedBackend(tokenizer)
        app.state.ember.backend = backend
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ember") as client:
            body = {"model": "m", "prompt": [1, 2], "max_tokens": 1}
            held = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
            await backend.two_waiting.wait()  # both hold their in-flight places
            refused = await client.post("/v1/completions", json=body)
            backend.gate.set()
            done = [(await t).status_code for t in held]
            after = await client.post("/v1/completions", json=body)
        return [*done, refused.status_code], refused.headers.get("retry-after"), after.status_code

    statuses, retry_after, after = asyncio.run(run())
    assert statuses == [200, 200, 503]
    assert retry_after is not None and int(retry_after) >= 1
    assert after == 200  # the limit frees up as requests finish


def test_toml_settings_are_overridden_by_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "ember.toml"
    config.write_text('port = 9001\nscheduler = "fcfs"\nmax_num_seqs = 4\nmodels = ["a", "b"]\n')
    monkeypatch.setenv("EMBER_API_KEY", "from-env")
    s = load_settings(config, {"port": 9002, "models": []})
    assert (s.port, s.scheduler, s.max_num_seqs, s.models, s.api_key) == (
        9002,
        "fcfs",
        4,
        ["a", "b"],
        "from-env",
    )
    assert load_settings(None, {}).models == ["smollm2-135m-instruct"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("port = 'x'\nbogus = 1\n", "unknown settings"), ("port = [", "ember.toml"), ("port = 0\n", "port")],
)
def test_bad_toml_settings_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "ember.toml"
    config.write_text(text)
    with pytest.raises(InvalidRequestError, match=message):
        load_settings(config, {})


class ColdBackend(GatedBackend):
    """Never gets an instance in time: what a cold start that times out looks like."""

    async def generate(self, model: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        from ember.errors import OverloadedError

        raise OverloadedError("no instance of 'm' became ready in time", retry_after_s=5.0)
        yield  # an async generator, as the backend's is


@pytest.mark.parametrize("stream", [False, True])
def test_a_cold_start_timeout_is_a_503_streaming_or_not(tokenizer: Any, stream: bool) -> None:
    async def run() -> httpx.Response:
        app = create_app()
        app.state.ember.backend = ColdBackend(tokenizer)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ember") as client:
            body = {"model": "m", "prompt": [1, 2], "max_tokens": 1, "stream": stream}
            return await client.post("/v1/completions", json=body)

    r = asyncio.run(run())
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert "in time" in r.json()["error"]["message"]
