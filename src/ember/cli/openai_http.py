"""The two calls `ember chat` makes to an OpenAI-compatible server, over httpx (a
dependency already; the `openai` package is only a test tool): list the models,
and stream a chat completion as server-sent events.

Errors become EmberErrors: no server -> a message saying how to start one; an error
body (HTTP status, or an error event in the stream) -> its message, a context-length
error as ContextLengthError so the chat can forget old turns and retry.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from ember import env
from ember.errors import ContextLengthError, EmberError, InvalidRequestError

_TIMEOUT = httpx.Timeout(600.0, connect=10.0)  # a long answer on a CPU takes minutes


class ChatClient:
    """An OpenAI-compatible server at `url` (its root, without /v1)."""

    def __init__(
        self, url: str, api_key: str | None = None, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=f"{self.url}/v1", headers=headers, timeout=_TIMEOUT, transport=transport,
            verify=env.verify_tls(self.url),
        )  # fmt: skip

    def close(self) -> None:
        self._http.close()

    def models(self) -> list[str]:
        """The ids of the models the server serves."""
        with self._stream("GET", "/models") as response:
            response.read()
            return [m["id"] for m in response.json().get("data", [])]

    def stream_chat(
        self, model: str, messages: list[dict[str, str]], sampling: Mapping[str, Any] | None = None
    ) -> Iterator[str]:
        """The answer's text, piece by piece as the server streams it; `sampling` adds
        body fields such as temperature, top_p and seed."""
        body = {"model": model, "messages": messages, "stream": True, **(sampling or {})}
        with self._stream("POST", "/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, other SSE fields
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _error(chunk, status=chunk["error"].get("code"))
                for choice in chunk.get("choices", []):
                    if content := choice.get("delta", {}).get("content"):
                        yield content

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        connected = False
        try:
            with self._http.stream(method, path, **kwargs) as response:
                connected = True
                if response.status_code >= 400:
                    response.read()
                    raise _http_error(response, self.url)
                yield response
        except httpx.TransportError as exc:
            if connected:
                raise EmberError(f"lost the connection to {self.url}: {exc}") from exc
            raise EmberError(
                f"no Ember server at {self.url} (start one with `ember serve`, or use --embedded)"
            ) from exc


def _http_error(response: httpx.Response, url: str) -> EmberError:
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text or f"HTTP {response.status_code}"}}
    return _error(body, status=response.status_code, url=url)


def _error(body: Any, *, status: Any, url: str | None = None) -> EmberError:
    """OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, as an EmberError."""
    error = body.get("error") if isinstance(body, dict) else None
    message = str(error.get("message", error)) if isinstance(error, dict) else str(body)
    if status == 400:
        return (ContextLengthError if "context" in message else InvalidRequestError)(message)
    return EmberError(f"{url}: {message}" if url else message)
