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
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ember.backend import ModelBackend, ModelState
from ember.errors import (
    AuthenticationError,
    EmberError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
)
from ember.server.health import health_answer, model_states
from ember.server.in_flight import Slot, SlotStream, internal_error
from ember.server.metrics import ServerMetrics
from ember.server.openapi import ERRORS, declare_schemas, json_body, streamed
from ember.server.protocol import ChatCompletionRequest, CompletionRequest
from ember.server.response_models import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ModelCard,
    ModelList,
)
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
    admin_key: str | None = None  # when set, the /admin routes take it and only it
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

    def admit(self) -> Slot:
        """A place in flight for one more request; OverloadedError past the limit."""
        if self.in_flight >= self.max_in_flight:
            message = f"{self.in_flight} requests in flight; try again shortly"
            raise OverloadedError(message, retry_after_s=1.0)
        self.in_flight += 1
        return Slot(self._release)

    def _release(self) -> None:
        self.in_flight -= 1

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


def _validation_error(exc: ValidationError | RequestValidationError) -> InvalidRequestError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int) and p != "body") or None
    return InvalidRequestError(f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)


_TOO_DEEP = "the body nests too deeply (JSON arrays and objects in each other, about 1,000 levels)"
# A JSON escape of a UTF-16 surrogate: the only way a lone one gets into a parsed body.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(body: Any) -> str | None:
    """The path ("messages.0.content") of a string in `body` that holds a lone
    UTF-16 surrogate (a "\\ud800" escape with no pair: not Unicode text), else None.
    Iterative: the body may nest as deep as the JSON parser allowed."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))
    return None


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"the body is not valid UTF-8 ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc.msg} at position {exc.pos}") from exc
    except RecursionError as exc:
        raise InvalidRequestError(_TOO_DEEP) from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("the body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw) and (where := _lone_surrogate(body)) is not None:
        top = where.split(".")[0]
        raise InvalidRequestError(
            f"{where}: a lone UTF-16 surrogate escape (such as \\ud800) is not valid Unicode text",
            param=top if top in body else None,
        )
    return body


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
    body = _parse_json(b"".join(chunks))
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from exc
    except RecursionError as exc:
        raise InvalidRequestError(_TOO_DEEP) from exc


async def _until_disconnected(request: Request) -> None:
    """Return once the client has gone. The body has been read, so what the server
    sends next is http.disconnect: when the connection closes (or the response ends)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[BaseModel]) -> Response:
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
    return JSONResponse(task.result().model_dump(mode="json"))


class ApiKeyGuard:
    """The API key, on every route but /health and /metrics, and the admin key (when
    there is one) on every /admin route, where the API key does not do: a pure ASGI
    middleware. (Not `@app.middleware("http")`: BaseHTTPMiddleware hands the routes a receive that
    swallows the client's http.disconnect, so a non-streaming request whose client
    had gone kept generating.)"""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            admin = self.state.admin_key is not None and _is_admin(scope["path"])
            key = self.state.admin_key if admin else self.state.api_key
            if key and scope["path"] not in _OPEN_PATHS and not _bearer_is(scope, key):
                which = "admin key" if admin else "API key"
                error = AuthenticationError(f"a missing or wrong {which} (send 'Authorization: Bearer KEY')")
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_admin(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


def _bearer_is(scope: Scope, key: str) -> bool:
    header = Headers(scope=scope).get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else ""
    return hmac.compare_digest(token.encode(), key.encode())


def create_app(
    *,
    api_key: str | None = None,
    admin_key: str | None = None,
    max_body_bytes: int = 2 << 20,
    max_in_flight: int = 256,
) -> FastAPI:
    """The ASGI app. Attach a backend with `app.state.ember.backend = ...` once the
    models are ready; until then /health answers 503. `admin_key`: the key of the
    /admin routes (server/admin.py); unset, they take `api_key` as every route does."""
    state = ServerState(api_key, max_body_bytes, max_in_flight, admin_key=admin_key)
    metrics = ServerMetrics(lambda: state.backend.gauges() if state.backend else {}, lambda: state.in_flight)
    app = FastAPI(title="Ember", docs_url=None, redoc_url=None)
    app.state.ember = state
    app.state.metrics = metrics

    app.add_middleware(ApiKeyGuard, state=state)
    _add_error_handlers(app)
    declare_schemas(app, CompletionRequest, ChatCompletionRequest, CompletionChunk, ChatCompletionChunk)

    # The routes find the state through the request, never a closure: FastAPI keeps
    # every route's function in a process-wide cache, and a closure over the state
    # would keep each app's backend (models, nodes) alive after the app is gone.
    @app.get("/health")
    async def health(request: Request) -> Response:
        status, body = server_state(request).health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(request: Request) -> Response:
        text = request.app.state.metrics.render()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=ERRORS)
    async def list_models(request: Request) -> ModelList:
        backend = server_state(request).require_backend()
        return ModelList(data=[_model_card(m.name, m.created) for m in backend.models()])

    @app.get("/v1/models/{name:path}", responses=ERRORS)
    async def get_model(name: str, request: Request) -> ModelCard:
        info = server_state(request).require_backend().model(name)
        return _model_card(info.name, info.created)

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses={200: streamed(CompletionChunk), **ERRORS},
        openapi_extra=json_body(CompletionRequest),
    )
    async def completions(request: Request) -> Response:
        req = await read_body(request, server_state(request), CompletionRequest)
        return await _serve(request, req)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: streamed(ChatCompletionChunk), **ERRORS},
        openapi_extra=json_body(ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Response:
        req = await read_body(request, server_state(request), ChatCompletionRequest)
        return await _serve(request, req)

    return app


def server_state(request: Request) -> ServerState:
    """The state of the app serving `request` (create_app's)."""
    state: ServerState = request.app.state.ember
    return state


async def _serve(request: Request, req: CompletionRequest | ChatCompletionRequest) -> Response:
    state = server_state(request)
    backend = state.require_backend()
    info = backend.model(req.model)
    slot = state.admit()  # left once the response has ended, whatever happened (in_flight.py)
    response: Response | None = None
    try:
        choices = build_choices(req, info, uuid.uuid4().hex)
        gen = Generation(backend, req.model, choices, req.n, request.app.state.metrics)
        slot.close = gen.close
        chat = isinstance(req, ChatCompletionRequest)
        if req.stream:
            await gen.start()  # errors before the first token get their own status
            stream = (chat_stream if chat else completion_stream)(gen, req.model, req.include_usage)
            response = SlotStream(stream, slot)
        else:
            whole = (chat_completion if chat else completion)(gen, req.model)
            response = await _unless_disconnected(request, whole)
        return response
    except EmberError:
        raise
    except Exception as exc:  # a bug: a 500 in OpenAI's shape, and the server serves on
        raise internal_error(exc) from exc
    finally:
        if not isinstance(response, SlotStream):  # which leaves the slot once it has ended
            await slot.leave()


def _model_card(name: str, created: int) -> ModelCard:
    return ModelCard(id=name, created=created, owned_by="ember")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, those no route raised too."""

    @app.exception_handler(EmberError)
    async def ember_error(_: Request, exc: EmberError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Starlette's router raises these with the bare reason phrase: no route (404), or
        # not with this method (405). Anything else says what it is in its detail.
        where = f"{request.method} {request.url.path}"
        from_router = exc.detail == HTTPStatus(exc.status_code).phrase
        error: EmberError
        if exc.status_code == 404 and from_router:
            error = NotFoundError(f"there is no route {where}", verbatim=True)
        elif exc.status_code == 405 and from_router:
            allowed = (exc.headers or {}).get("Allow", "")
            error = MethodNotAllowedError(f"{where} is not allowed (allowed: {allowed})", verbatim=True)
        else:
            kind = InvalidRequestError if exc.status_code < 500 else EmberError
            error = kind(f"{where}: {exc.detail}")
            error.status = exc.status_code
        response = error_response(error)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        # The server logs the exception (Starlette re-raises it once this is sent).
        return error_response(EmberError("the server failed on this request: see its log"))
