"""Property-based tests of the API against its own /openapi.json.

schemathesis makes requests from the documented request bodies (with the model "tiny"
and a few tokens filled in) and checks that none gets a 5xx or outlives a 60 s client
timeout, that every response has a documented status and content type, that every
error has OpenAI's shape and every 2xx body, each streamed event included, is valid
against its documented model. A Hypothesis test checks what a per-event schema cannot:
that a stream ends with [DONE], finishes every choice once, and says what the same
request says unstreamed.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ember.server.app import create_app
from ember.server.response_models import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ErrorResponse,
)
from tests.server.conftest import API_KEY, LiveServer

pytestmark = pytest.mark.timeout(600)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_TOKENS = 4
VOCAB = 49152  # the tiny model's (SmolLM2's tokenizer)

# The app's own document, as the live server serves it (test_the_served_document_is_the_apps).
# Built here, not fetched, so that pytest can make one test per operation.
schema = schemathesis.openapi.from_dict(create_app().openapi())


def _fill_in(body: Any) -> None:
    """The served model, and few tokens (a chat's default is the whole context)."""
    if not isinstance(body, dict):
        return
    body["model"] = "tiny"
    for limit in ("max_tokens", "max_completion_tokens"):
        value = body.get(limit)
        if value is None or (isinstance(value, int) and value > MAX_TOKENS):
            body[limit] = MAX_TOKENS


@pytest.mark.slow  # about 40 s of requests on 2 cores
@schema.parametrize()
@settings(max_examples=50, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_keeps_its_documented_promises(case: Any, live_server: LiveServer) -> None:
    _fill_in(case.body)
    # Not checked: that every schema-valid body is accepted (token ids past the vocabulary,
    # a prompt past the context: limits of the served model, which no schema states) and
    # that every schema-invalid one is refused (pydantic takes 1.0 for an integer).
    unchecked = [schemathesis.checks.positive_data_acceptance, schemathesis.checks.negative_data_rejection]
    response = case.call_and_validate(
        base_url=live_server.url, headers=AUTH, timeout=60, excluded_checks=unchecked
    )
    if response.status_code >= 400:
        ErrorResponse.model_validate(response.json())


def test_the_served_document_is_the_apps(live_server: LiveServer) -> None:
    served = httpx.get(f"{live_server.url}/openapi.json", headers=AUTH).json()
    assert served == create_app().openapi()
    schemas = served["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "Completion", "ChatCompletion",
                 "CompletionChunk", "ChatCompletionChunk", "ModelList", "ErrorResponse"):  # fmt: skip
        assert name in schemas, name
    body = served["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}


@st.composite
def _stream_requests(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tiny",
        "max_tokens": draw(st.integers(1, MAX_TOKENS)),
        "temperature": 0,  # greedy: the streamed text must equal the unstreamed one
        "n": draw(st.integers(1, 3)),
        "ignore_eos": draw(st.booleans()),
    }
    if draw(st.booleans()):
        body["stop"] = draw(st.lists(st.text(min_size=1, max_size=2), min_size=1, max_size=2))
    if draw(st.booleans()):
        body["stream_options"] = {"include_usage": True}
    if draw(st.booleans()):
        body["messages"] = [{"role": "user", "content": draw(st.text(max_size=30))}]
        if draw(st.booleans()):
            body.update(logprobs=True, top_logprobs=draw(st.integers(0, 3)))
    else:
        text = st.text(min_size=1, max_size=30)
        ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6)
        body["prompt"] = draw(text | ids | st.lists(text, min_size=1, max_size=2))
        if draw(st.booleans()):
            body["logprobs"] = draw(st.integers(0, 3))
    return body


def _events(response: httpx.Response) -> list[str]:
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line.removeprefix("data: ") for line in lines]


def _text(choice: dict[str, Any], chat: bool) -> str:
    return str(choice["message"]["content"] if chat else choice["text"])


@given(body=_stream_requests())
@settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_a_stream_is_the_response_in_chunks_then_done(live_server: LiveServer, body: dict[str, Any]) -> None:
    chat = "messages" in body
    path = f"{live_server.base_url}/{'chat/completions' if chat else 'completions'}"
    whole = httpx.post(path, json=body, headers=AUTH, timeout=60)
    streamed = httpx.post(path, json={**body, "stream": True}, headers=AUTH, timeout=60)
    if whole.status_code != 200:  # e.g. a prompt the tokenizer makes too long: refused alike
        assert streamed.status_code == whole.status_code
        ErrorResponse.model_validate(streamed.json())
        return
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = _events(streamed)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    model: type[BaseModel] = ChatCompletionChunk if chat else CompletionChunk
    chunks = [model.model_validate_json(e).model_dump() for e in events[:-1]]
    expected = (ChatCompletion if chat else Completion).model_validate(whole.json()).model_dump()
    texts: dict[int, str] = {}
    finishes: dict[int, list[str]] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            piece = (c["delta"].get("content") or "") if chat else c["text"]
            texts[c["index"]] = texts.get(c["index"], "") + piece
            if c["finish_reason"] is not None:
                finishes.setdefault(c["index"], []).append(c["finish_reason"])
    assert texts == {c["index"]: _text(c, chat) for c in expected["choices"]}
    assert finishes == {c["index"]: [c["finish_reason"]] for c in expected["choices"]}
    asked_usage = "stream_options" in body
    assert all(("usage" in json.loads(e)) == asked_usage for e in events[:-1])
    if asked_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == expected["usage"]
