"""The HTTP server: OpenAI-compatible routes, health, metrics, errors in OpenAI's shape.

The app starts answering at once: /health is 503 until a backend is attached (the
first-run import and load happen after the socket is open) and every model it serves
can serve, then 200 (server/health.py: each model's state in the body). While it is
starting, every 503 says what the start-up is doing ("importing the model, 42% done").
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from ember.backend import ModelBackend, ModelState
from ember.errors import (
    AuthenticationError,
    EmberError,
    InvalidRequestError,
    OverloadedError,
    PayloadTooLargeError,
)
from ember.server.health import health_answer, model_states
from ember.server.metrics import ServerMetrics
from ember.server.protocol import ChatCompletionRequest, CompletionRequest
from ember.server.responses import chat_completion, chat_stream, completion, completion_stream
from ember.server.serving import Generation, build_choices, error_body

M = TypeVar("M", bound=BaseModel)
_OPEN_PATHS = {"/health", "/metrics"}
STARTING = "loading the models"


@dataclass
class ServerState:
    api_key: str | None
    max_body_bytes: int
    max_in_flight: int
    backend: ModelBackend | None = None
    in_flight: int = 0
    draining: bool = False
    startup_error: BaseException | None = None
    # what the start-up is doing, set by the loader thread: "importing the model, 42% done"
    startup_stage: str = STARTING
    models: list[str] = field(default_factory=list)  # what /health answers for (none: the backend's)
    # each model's state as the control plane sees it, once there is one (the runner sets it)
    live_states: Callable[[], Mapping[str, ModelState]] | None = None
    imports: dict[str, ModelState] = field(default_factory=dict)  # first-run imports under way
    exit_reason: str | None = None  # why `ember serve` stops and exits non-zero (a model failed)

    def require_backend(self) -> ModelBackend:
        if self.startup_error is not None:
            raise OverloadedError(f"the server failed to start: {self.startup_error}", retry_after_s=60.0)
        if self.draining:
            raise OverloadedError("the server is stopping", retry_after_s=2.0)
        if self.backend is None:
            raise OverloadedError(f"the server is starting: {self.startup_stage}", retry_after_s=2.0)
        return self.backend

    def model_states(self) -> dict[str, ModelState]:
        """Each served model's state (starting, importing, ready, failed)."""
        live = dict(self.live_states()) if self.live_states is not None else {}
        models = self.models
        if not models and self.backend is not None:  # an app given no model list: the backend's
            models = [m.name for m in self.backend.models()]
            live = {name: live.get(name, ModelState("ready")) for name in models}
        return model_states(models, live, self.imports, self.startup_error)

    def health(self) -> tuple[int, dict[str, Any]]:
        """/health's status code and body."""
        return health_answer(
            self.model_states(), attached=self.backend is not None, draining=self.draining,
            stage=self.startup_stage, startup_error=self.startup_error,
        )  # fmt: skip


def error_response(exc: EmberError) -> JSONResponse:
    headers = {}
    if isinstance(exc, OverloadedError):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)


def _validation_error(exc: ValidationError) -> InvalidRequestError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int)) or None
    return InvalidRequestError(f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)


async def read_body(request: Request, state: ServerState, model: type[M]) -> M:
    """Parse a JSON body into `model`, enforcing the body size limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise PayloadTooLargeError(f"the request body is over the limit of {state.max_body_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_body_bytes:
            raise PayloadTooLargeError(f"the request body is over the limit of {state.max_body_bytes} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"the body is not valid UTF-8 ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc.msg} at position {exc.pos}") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


async def _unless_disconnected(request: Request, work: Awaitable[dict[str, Any]]) -> Response:
    """Run a non-streaming generation; a client that goes away aborts it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_until_disconnected(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)
    return JSONResponse(task.result())


def create_app(
    *, api_key: str | None = None, max_body_bytes: int = 2 << 20, max_in_flight: int = 256
) -> FastAPI:
    """The ASGI app. Attach a backend with `app.state.ember.backend = ...` once the
    models are ready; until then /health answers 503."""
    state = ServerState(api_key, max_body_bytes, max_in_flight)
    metrics = ServerMetrics(lambda: state.backend.gauges() if state.backend else {})
    app = FastAPI(title="Ember", docs_url=None, redoc_url=None)
    app.state.ember = state
    app.state.metrics = metrics

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            if state.api_key and request.url.path not in _OPEN_PATHS:
                header = request.headers.get("authorization", "")
                token = header[7:] if header.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                    raise AuthenticationError("a missing or wrong API key (send 'Authorization: Bearer KEY')")
            return await call_next(request)
        except EmberError as exc:
            return error_response(exc)

    @app.exception_handler(EmberError)
    async def ember_error(_: Request, exc: EmberError) -> JSONResponse:
        return error_response(exc)

    @app.get("/health")
    async def health() -> Response:
        status, body = state.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        backend = state.require_backend()
        return {"object": "list", "data": [_model_card(m.name, m.created) for m in backend.models()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        info = state.require_backend().model(name)
        return _model_card(info.name, info.created)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await read_body(request, state, CompletionRequest)
        return await _serve(request, req)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await read_body(request, state, ChatCompletionRequest)
        return await _serve(request, req)

    async def _serve(request: Request, req: CompletionRequest | ChatCompletionRequest) -> Response:
        backend = state.require_backend()
        info = backend.model(req.model)
        if state.in_flight >= state.max_in_flight:
            raise OverloadedError(
                f"{state.in_flight} requests in flight; try again shortly", retry_after_s=1.0
            )
        choices = build_choices(req, info, uuid.uuid4().hex)
        gen = Generation(backend, req.model, choices, req.n, metrics)
        chat = isinstance(req, ChatCompletionRequest)
        state.in_flight += 1
        if req.stream:
            try:
                await gen.start()  # errors before the first token get their own status
            except BaseException:
                state.in_flight -= 1
                raise
            stream = (chat_stream if chat else completion_stream)(gen, req.model, req.include_usage)
            return StreamingResponse(_counted(stream), media_type="text/event-stream")
        try:
            return await _unless_disconnected(
                request, (chat_completion if chat else completion)(gen, req.model)
            )
        finally:
            state.in_flight -= 1

    async def _counted(stream: AsyncIterator[str]) -> AsyncIterator[str]:
        try:
            async for item in stream:
                yield item
        finally:
            state.in_flight -= 1

    return app


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "ember"}
