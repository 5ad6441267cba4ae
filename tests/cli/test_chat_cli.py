"""`ember chat`: stdin lines are turns; the model runs in the process (--embedded) or
on a server, spoken to over httpx with server-sent events."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from ember.cli import app
from ember.cli.chat import _answer
from ember.cli.openai_http import ChatClient
from ember.errors import EmberError
from ember.store.local import LocalStore
from tests.server.conftest import API_KEY, LiveServer, live_server  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tiny_in_store(tiny_llama: tuple[Path, Any]) -> str:
    store = LocalStore()
    shutil.copytree(tiny_llama[0], store.path_for("tiny"))
    store.register("tiny")
    return "tiny"


def test_embedded_chat_forgets_old_turns_to_keep_going(tiny_in_store: str) -> None:
    # The tiny model's context is 256 tokens and its random answers fill it, so the
    # second and third turns only fit once the oldest turns are forgotten.
    result = CliRunner().invoke(
        app, ["chat", tiny_in_store, "--embedded"], input="hello\n\nhow are you?\nbye\n"
    )
    assert result.exit_code == 0, result.output
    assert "error" not in result.stderr  # (the random answers on stdout may well say "error")


def test_embedded_chat_refuses_one_too_long_line_and_goes_on(tiny_in_store: str) -> None:
    result = CliRunner().invoke(
        app, ["chat", tiny_in_store, "--embedded"], input="word " * 400 + "\nshort question\n"
    )
    assert result.exit_code == 0, result.output
    assert "error: the conversation is" in result.output


def test_embedded_chat_with_an_unknown_model_fails_clearly() -> None:
    result = CliRunner().invoke(app, ["chat", "nope", "--embedded"], input="hi\n")
    assert result.exit_code == 1
    assert "nope" in result.output


# -- against a server: httpx, server-sent events ----------------------------------------


def _sse(*events: object) -> bytes:
    return (
        "".join(f"data: {json.dumps(e)}\n\n" for e in (*events, "[DONE]"))
        .replace('"[DONE]"', "[DONE]")
        .encode()
    )


def _delta(text: str) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


class FakeServer:
    """An OpenAI-compatible server for ChatClient: serves model "m"; a conversation of
    more than `fits` messages is over its context (a 400, as Ember answers)."""

    def __init__(self, fits: int = 99) -> None:
        self.fits = fits
        self.seen: list[list[dict[str, str]]] = []
        self.bodies: list[dict[str, Any]] = []
        self.auth: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("authorization"))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "m", "object": "model"}]})
        self.bodies.append(json.loads(request.content))
        messages = self.bodies[-1]["messages"]
        self.seen.append(messages)
        if len(messages) > self.fits:
            error = {"message": "the prompt is 300 tokens; this model's context is 256", "code": 400}
            return httpx.Response(400, json={"error": error})
        return httpx.Response(200, content=_sse(_delta("Par"), {"choices": []}, _delta("is")))


def _client(server: FakeServer, key: str | None = None) -> ChatClient:
    return ChatClient("http://ember.test", key, transport=httpx.MockTransport(server))


def test_chat_client_lists_models_and_streams_the_answer() -> None:
    server = FakeServer()
    client = _client(server, key="k")
    assert client.models() == ["m"]
    assert list(client.stream_chat("m", [{"role": "user", "content": "capital of France?"}])) == ["Par", "is"]
    assert server.auth == ["Bearer k", "Bearer k"]


def test_chat_sends_its_sampling_options_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    server = FakeServer()
    monkeypatch.setattr("ember.cli.openai_http.httpx.Client", _with_transport(server))
    result = CliRunner().invoke(
        app, ["chat", "--url", "http://ember.test", "--temperature", "0", "--seed", "7"], input="hi\n"
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
    assert [(b["temperature"], b["top_p"], b["seed"]) for b in server.bodies] == [(0.0, 0.9, 7)]
    CliRunner().invoke(app, ["chat", "--url", "http://ember.test"], input="hi\n")
    assert server.bodies[-1]["temperature"] == 0.7 and "seed" not in server.bodies[-1]


def _with_transport(server: FakeServer) -> Any:
    real = httpx.Client

    def client(**kwargs: Any) -> httpx.Client:
        return real(**{**kwargs, "transport": httpx.MockTransport(server)})

    return client


def test_chat_over_http_forgets_old_turns_when_the_server_says_context(capsys: Any) -> None:
    server = FakeServer(fits=3)
    client = _client(server)
    messages = [{"role": "system", "content": "be brief"}]
    for question in ("one", "two"):
        messages.append({"role": "user", "content": question})
        answer = _answer(lambda m: client.stream_chat("m", m), messages)
        assert answer == "Paris"
        messages.append({"role": "assistant", "content": answer})
    # the second turn did not fit (5 messages), so the first exchange was forgotten
    assert [len(m) for m in server.seen] == [2, 4, 2]
    assert server.seen[-1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two"}]
    assert "error" not in capsys.readouterr().err


def test_chat_client_errors_are_ember_errors() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(401, json={"error": {"message": "wrong API key", "code": 401}})
        body = _sse({"error": {"message": "the node failed", "type": "overloaded_error", "code": 503}})
        return httpx.Response(200, content=body)

    client = ChatClient("http://ember.test", transport=httpx.MockTransport(refuse))
    with pytest.raises(EmberError, match="http://ember.test: wrong API key"):
        client.models()
    with pytest.raises(EmberError, match="the node failed"):
        list(client.stream_chat("m", [{"role": "user", "content": "hi"}]))


def test_chat_without_a_server_says_how_to_start_one() -> None:
    with socket.socket() as sock:  # bound, not listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = CliRunner().invoke(app, ["chat", "--url", url], input="hi\n")
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"error: no Ember server at {url} (start one with `ember serve`, or use --embedded)\n"
    )


@pytest.mark.slow
def test_chat_with_a_live_server_forgets_old_turns_to_keep_going(live_server: LiveServer) -> None:  # noqa: F811
    # the same conversation as the embedded test, through HTTP: the server's 400 for a
    # conversation over the tiny model's 256 tokens makes the chat forget and go on
    result = CliRunner().invoke(
        app, ["chat", "tiny", "--url", live_server.url], input="hello\n\nhow are you?\nbye\n",
        env={"EMBER_API_KEY": API_KEY},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "error" not in result.stderr  # (the random answers on stdout may well say "error")
