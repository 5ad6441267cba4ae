"""`ember serve`: bind the socket at once, load the models in the background, serve
until SIGTERM / Ctrl-C, then drain.

Start-up: uvicorn binds and answers /health with 503 while a loader thread imports
the default model on first run (with a progress bar on the console) and starts one
engine per model; /health turns 200 when every model is ready.
Shutdown: uvicorn stops accepting and gives in-flight requests `shutdown_grace_s`
to finish; what is left is aborted when the engines shut down; the exit status is 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from ember.engine.async_engine import AsyncEngine
from ember.server.app import create_app
from ember.server.backend import EmbeddedBackend
from ember.server.settings import DEFAULT_MODEL, ServeSettings

log = logging.getLogger("ember.serve")

ImportProgress = Callable[[str, int, int], None]  # (stage, done, total)
ProgressFactory = Callable[[], AbstractContextManager[ImportProgress]]


@contextlib.contextmanager
def logged_progress() -> Iterator[ImportProgress]:
    """Progress as log lines, one per stage (when there is no terminal for a bar)."""
    seen: set[str] = set()

    def update(stage: str, done: int, total: int) -> None:
        if stage not in seen:
            seen.add(stage)
            log.info("first run: %s", stage)

    yield update


def model_id(ref: str) -> str:
    """The id clients send: the store name, or a checkpoint directory's name."""
    path = Path(ref).expanduser()
    return path.name if path.is_dir() else ref


def start_engines(settings: ServeSettings, progress: ProgressFactory = logged_progress) -> EmbeddedBackend:
    """Import the default model if it is missing, then start one engine per model."""
    from ember.store.importer import ensure_default_model
    from ember.store.local import LocalStore

    store = LocalStore()
    engines: dict[str, AsyncEngine] = {}
    try:
        for ref in settings.models:
            if ref == DEFAULT_MODEL and not store.exists(ref):
                log.info("importing %s into the store (first run)", ref)
                with progress() as update:
                    ensure_default_model(store, progress=update)
            path = store.resolve(ref)
            engines[model_id(ref)] = AsyncEngine.from_checkpoint(path, **settings.engine_options())
            log.info("model %s ready", model_id(ref))
    except BaseException:
        for e in engines.values():
            e.shutdown()
        raise
    return EmbeddedBackend(engines, created=int(time.time()))


def build_app(settings: ServeSettings, progress: ProgressFactory = logged_progress) -> FastAPI:
    """The app, with a lifespan that loads the models in a thread after the socket is up."""
    app = create_app(
        api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, max_in_flight=settings.max_in_flight
    )
    state = app.state.ember

    def load() -> None:
        try:
            state.backend = start_engines(settings, progress)
        except Exception as exc:
            state.startup_error = exc
            log.error("start-up failed: %s", exc)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load, name="ember-loader", daemon=True)
        loader.start()
        try:
            yield
        finally:
            state.draining = True
            loader.join(timeout=60)
            if state.backend is not None:
                await state.backend.close()

    app.router.lifespan_context = lifespan
    return app


def serve(settings: ServeSettings, progress: ProgressFactory = logged_progress) -> None:
    """Run the server in the foreground until SIGTERM or Ctrl-C."""
    app = build_app(settings, progress)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        access_log=settings.log_level == "debug",
    )
    # uvicorn re-raises the stop signal once it has shut down, under the handlers that
    # were in place before it ran; no-op handlers make a graceful stop exit with 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
