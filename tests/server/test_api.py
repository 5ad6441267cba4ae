"""The OpenAI-compatible API against a live server, with the official client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, LiveServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url, api_key=API_KEY, max_retries=0)


def _post(server: LiveServer, path: str, body: Any, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", **kw.pop("headers", {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base_url}{path}", content=content, headers=headers, timeout=60, **kw)


def _idle(server: LiveServer) -> bool:
    engine = server.engine.engine
    return engine.num_running == 0 and engine.num_waiting == 0 and engine.blocks.usage == 0.0


def _wait_idle(server: LiveServer) -> None:
    """Poll the engine (the server's thread aborts a request when it notices its client
    has gone: there is no event to wait on) for up to 20 s."""
    deadline = time.monotonic() + 20
    while not _idle(server):
        assert time.monotonic() < deadline, "the engine still holds requests or KV blocks after 20 s"
        time.sleep(0.05)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_greedy_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason in ("length", "stop")
    assert full.usage is not None and full.usage.completion_tokens > 0
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_greedy_stream_equals_non_stream_with_usage(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Hi there"}],
        max_completion_tokens=10,
        temperature=0,
    )
    full = client.chat.completions.create(**kw)
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens  # type: ignore[union-attr]


def test_token_id_prompt_and_length_finish(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="tiny", prompt=[5, 6, 7, 8], max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )  # type: ignore[call-overload]
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.prompt_tokens == 4 and out.usage.completion_tokens == 5


def test_sampling_fields_are_honoured(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model="tiny", prompt="The", max_tokens=8, temperature=0.9, top_p=0.9, seed=7, n=2,
        presence_penalty=0.5, frequency_penalty=0.5, user="u1", extra_body={"top_k": 20, "ignore_eos": True},
    )  # fmt: skip
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert a.usage is not None and a.usage.completion_tokens == 16


def test_logit_bias_forces_a_token(client: openai.OpenAI, tokenizer: Any) -> None:
    out = client.completions.create(
        model="tiny",
        prompt="x",
        max_tokens=3,
        temperature=0,
        logit_bias={"42": 100},
        extra_body={"ignore_eos": True},
    )
    assert out.choices[0].text == tokenizer.decode([42, 42, 42])


def test_logprobs_completion_and_chat(client: openai.OpenAI) -> None:
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 4
    assert lp.top_logprobs is not None and all(len(t) <= 3 for t in lp.top_logprobs)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)


def test_stop_string_ends_the_text(client: openai.OpenAI) -> None:
    free = client.completions.create(
        model="tiny", prompt="abc", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    text = free.choices[0].text
    assert len(text) >= 4  # the tiny model is seeded: the same text every run
    stop = text[2:4]
    cut = client.completions.create(
        model="tiny", prompt="abc", max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny"}, "prompt"),
        ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 10**9}, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "temperature": -0.5}, "temperature"),
        ({"model": "tiny", "prompt": "x", "top_p": 1.5}, "top_p"),
        ({"model": "tiny", "prompt": 12}, "prompt"),
        ({"model": "tiny", "prompt": "x", "n": "two"}, "n"),
        ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "tiny", "prompt": "x", "bogus": 1}, "bogus"),
        ({"model": "tiny", "prompt": ""}, "prompt"),
        ({"model": "tiny", "prompt": [99999999]}, None),
        ({"model": "tiny", "prompt": "word " * 400}, "prompt"),
    ],
)
def test_bad_completion_fields_get_400_naming_them(
    live_server: LiveServer, body: Any, param: str | None
) -> None:
    r = _post(live_server, "/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] is not None and param in err["param"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
            "response_format",
        ),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ],
)
def test_unsupported_chat_fields_get_400(live_server: LiveServer, extra: Any, param: str) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra}
    r = _post(live_server, "/chat/completions", body)
    assert r.status_code == 400 and param in (r.json()["error"]["param"] or "")


def test_malformed_json_invalid_utf8_and_non_object(live_server: LiveServer) -> None:
    for raw in (b"{not json", b'{"model": "tiny", "prompt": "\xff\xfe"}', b"[1, 2]"):
        r = _post(live_server, "/completions", raw)
        assert r.status_code == 400, raw
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_ten_megabyte_body_gets_413(live_server: LiveServer) -> None:
    body = json.dumps({"model": "tiny", "prompt": "a" * (10 << 20)}).encode()
    r = _post(live_server, "/completions", body)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]


def test_unknown_model_gets_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "nope" in str(info.value)


def test_api_key_is_required_except_health_and_metrics(live_server: LiveServer) -> None:
    bad = openai.OpenAI(base_url=live_server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(f"{live_server.base_url}/models").status_code == 401
    assert httpx.get(f"{live_server.url}/health").status_code == 200
    assert httpx.get(f"{live_server.url}/metrics").status_code == 200


def test_dropped_stream_aborts_and_frees_kv_blocks(live_server: LiveServer) -> None:
    body = {"model": "tiny", "prompt": "tell me", "max_tokens": 200, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", f"{live_server.base_url}/completions", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert all(g.startswith("data:") or not g for g in got)
    # The connection is closed mid-stream: the request must be aborted and freed.
    _wait_idle(live_server)


def test_fifty_concurrent_streams_are_all_served(live_server: LiveServer) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.completions.create(
            model="tiny",
            prompt=f"request {i}",
            max_tokens=4,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        finish = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return finish or ""

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=live_server.base_url, api_key=API_KEY, max_retries=0, timeout=90)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(50)))
        finally:
            await client.close()

    assert asyncio.run(run()) == ["length"] * 50
    _wait_idle(live_server)


def test_metrics_use_vllm_names(client: openai.OpenAI, live_server: LiveServer) -> None:
    client.completions.create(model="tiny", prompt="metrics", max_tokens=3, temperature=0)
    text = httpx.get(f"{live_server.url}/metrics").text
    for name in (
        "ember:time_to_first_token_seconds_bucket", "ember:inter_token_latency_seconds_bucket",
        "ember:e2e_request_latency_seconds_bucket", "ember:request_queue_time_seconds_bucket",
        "ember:num_requests_running", "ember:num_requests_waiting", "ember:kv_cache_usage_perc",
        "ember:prompt_tokens_total", "ember:generation_tokens_total", "ember:num_preemptions_total",
        "ember:num_swaps_out_total", "ember:num_swaps_in_total",
    ):  # fmt: skip
        assert f'{name}{{model_name="tiny"' in text or f"{name}{{" in text, name


def test_server_keeps_serving_after_bad_requests(client: openai.OpenAI, live_server: LiveServer) -> None:
    for _ in range(3):
        _post(live_server, "/completions", b"{oops")
    out = client.completions.create(model="tiny", prompt="still here", max_tokens=2, temperature=0)
    assert out.choices[0].text is not None
