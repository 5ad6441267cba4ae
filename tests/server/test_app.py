"""The HTTP layer against a live server: a client that leaves, errors in OpenAI's shape
for what never reaches a route (bad JSON, unknown routes, wrong methods)."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from ember.server.admin import add_admin_routes
from ember.server.app import create_app
from tests.server.conftest import API_KEY, LiveServer
from tests.server.test_keys import Backend

pytestmark = pytest.mark.timeout(120)


def _until(condition: Callable[[], bool], what: str, within_s: float = 20.0) -> None:
    """Poll `condition` (engine state changes on the engine thread: there is no event
    to wait on) until it holds, failing after `within_s`."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"still not {what} after {within_s} s"
        time.sleep(0.01)


def _in_engine(server: LiveServer) -> int:
    stats = server.engine.engine.stats()
    return stats.num_running + stats.num_waiting


def _finished(server: LiveServer) -> float:
    """Requests the metrics count as finished (ember:request_success, any reason)."""
    text = httpx.get(f"{server.url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ember:request_success_total{")
    )


def test_a_client_that_leaves_a_non_streaming_request_aborts_it(live_server: LiveServer) -> None:
    finished = _finished(live_server)
    body = json.dumps({"model": "tiny", "prompt": "tell me", "max_tokens": 240, "ignore_eos": True})
    url = urlsplit(live_server.url)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall((head + body).encode())
        _until(lambda: _in_engine(live_server) > 0, "in the engine")
    # The client has closed its connection before any answer: the request is aborted,
    # its slot and KV blocks freed, long before 240 tokens, and it is no success.
    _until(lambda: _in_engine(live_server) == 0, "gone from the engine")
    assert live_server.engine.engine.stats().kv_cache_usage == 0.0
    assert _finished(live_server) == finished


def _post(server: LiveServer, path: str, raw: bytes, client: httpx.Client | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return (client or httpx).post(f"{server.base_url}{path}", content=raw, headers=headers, timeout=60)  # type: ignore[attr-defined]


def _openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["code"] == status
    return dict(body["error"])


def test_json_nested_thousands_deep_is_a_400_and_the_connection_serves_on(live_server: LiveServer) -> None:
    deep = b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    with httpx.Client() as client:
        err = _openai_error(_post(live_server, "/completions", deep, client), 400)
        assert "nests too deeply" in err["message"]
        ok = _post(live_server, "/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": 1}', client)
        assert ok.status_code == 200  # on the same connection


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/completions", rb'{"model": "tiny", "prompt": "a\ud800b"}', "prompt"),
        ("/completions", rb'{"model": "tiny", "prompt": ["ok", "\udfff"]}', "prompt"),
        ("/chat/completions", rb'{"model": "tiny", "messages": [{"role": "user", "content": "\ud800"}]}',
         "messages"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_400_that_says_so(
    live_server: LiveServer, path: str, raw: bytes, param: str
) -> None:
    err = _openai_error(_post(live_server, path, raw), 400)
    assert err["param"] == param and "surrogate" in err["message"], err
    assert "Error" not in err["message"]  # no tokenizer internals (TypeError, ...)


def test_a_surrogate_pair_is_text(live_server: LiveServer) -> None:
    raw = rb'{"model": "tiny", "prompt": "fire \ud83d\udd25", "max_tokens": 1}'
    assert _post(live_server, "/completions", raw).status_code == 200


def test_unknown_routes_and_wrong_methods_get_errors_in_openai_shape(live_server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    missing = httpx.get(f"{live_server.base_url}/nope", headers=headers)
    assert "GET /v1/nope" in _openai_error(missing, 404)["message"]
    wrong = httpx.get(f"{live_server.base_url}/completions", headers=headers)
    assert "POST" in _openai_error(wrong, 405)["message"]
    assert wrong.headers["allow"] == "POST"
    # Without the key, the key is what is wrong.
    _openai_error(httpx.get(f"{live_server.base_url}/nope"), 401)


def test_an_app_once_dropped_frees_its_backend() -> None:
    """Nothing global keeps an app's state (FastAPI caches every route's function for
    good): a process that builds servers one after another, as `bench cluster` does for
    each policy, gets each one's models back."""
    app = create_app()
    add_admin_routes(app)
    backend = Backend()
    app.state.ember.backend = backend
    gone = weakref.ref(backend)

    async def visit(app: Any) -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ember") as client:
            paths = ("/health", "/metrics", "/v1/models", "/admin/status")
            return [(await client.get(p)).status_code for p in paths]

    assert asyncio.run(visit(app)) == [200, 200, 200, 200]
    del app, backend
    gc.collect()
    assert gone() is None
