"""What the request bodies accept, with the official client: what OpenAI accepts (nulls,
newer harmless fields, top_p 0), and what would change the output silently refused."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, LiveServer

pytestmark = pytest.mark.timeout(120)
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url, api_key=API_KEY, max_retries=0)


def _post(server: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    return httpx.post(f"{server.base_url}{path}", content=json.dumps(body), headers=headers, timeout=60)


_CHAT_NULLS = [
    "n", "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty",
    "frequency_penalty", "tools", "tool_choice", "functions", "function_call",
    "parallel_tool_calls", "response_format", "seed", "stop", "temperature", "top_p",
    "logit_bias", "user", "max_tokens", "audio", "modalities", "prediction",
    "web_search_options", "metadata", "store", "service_tier", "reasoning_effort",
    "verbosity", "moderation", "top_k", "ignore_eos",
]  # fmt: skip
_COMPLETION_NULLS = [
    "n", "stream", "stream_options", "logprobs", "echo", "best_of", "suffix",
    "presence_penalty", "frequency_penalty", "seed", "stop", "temperature", "top_p",
    "logit_bias", "user", "max_tokens",
]  # fmt: skip


def test_an_explicit_null_means_not_given(live_server: LiveServer) -> None:
    chat = {"model": "tiny", "messages": HI, "max_completion_tokens": 2, **dict.fromkeys(_CHAT_NULLS)}
    r = _post(live_server, "/chat/completions", chat)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1  # n: null is n: 1
    completion = {"model": "tiny", "prompt": "Hi", **dict.fromkeys(_COMPLETION_NULLS)}
    r = _post(live_server, "/completions", completion)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 16  # max_tokens: null is the default


def test_nulls_through_the_client(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="tiny", messages=HI, max_completion_tokens=2, n=None, logprobs=None, top_logprobs=None,
        presence_penalty=None, seed=None, stop=None, temperature=None, top_p=None, user=None,
    )  # type: ignore[call-overload]  # fmt: skip
    assert out.choices[0].message.role == "assistant"


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": []},
        {"tool_choice": "none"},
        {"tools": [], "tool_choice": "auto"},
        {"parallel_tool_calls": False},
        {"modalities": ["text"]},
        {"response_format": {"type": "text"}},
        {"verbosity": "low"},
        {"safety_identifier": "user-1"},
        {"prompt_cache_key": "conversation-1"},
        {"prompt_cache_retention": "24h"},
        {"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}},
    ],
)
def test_fields_that_ask_for_nothing_or_change_nothing_are_accepted(
    client: openai.OpenAI, extra: dict[str, Any]
) -> None:
    out = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=2, **extra)
    if extra.get("stream"):
        chunks = list(out)  # type: ignore[call-overload]
        assert chunks[-1].usage is not None
    else:
        assert out.choices[0].finish_reason in ("stop", "length")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
        ({"extra_body": {"not_a_field": 1}}, "not_a_field"),
    ],
)
def test_fields_that_would_change_the_output_are_refused_by_name(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=2, **extra)
    assert info.value.param == param


def test_top_p_zero_is_greedy(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="tiny", prompt="Once", max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    assert client.completions.create(temperature=1.5, top_p=0, **kw).choices[0].text == greedy
    assert client.completions.create(top_p=0, n=2, **kw).choices[1].text == greedy


def test_chat_responses_carry_refusal_fields(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=HI, max_completion_tokens=2, logprobs=True, top_logprobs=1
    )
    choice = raw.http_response.json()["choices"][0]
    assert "refusal" in choice["message"] and choice["message"]["refusal"] is None
    assert "refusal" in choice["logprobs"] and choice["logprobs"]["refusal"] is None
    assert raw.parse().choices[0].message.refusal is None
