"""`ember serve`: serve on the socket bound at once (server/listen.py), load the models
in the background, serve until SIGTERM / Ctrl-C, then drain.

Start-up: uvicorn serves the socket and answers /health with 503 while a loader thread imports
the default model on first run (with a progress bar on the console) and starts the
control plane: `--nodes` embedded nodes of `--slots` instances each, one deployment
per model with one instance always up; /health turns 200 when those are ready.
Shutdown: uvicorn stops accepting and gives in-flight requests `shutdown_grace_s`
to finish; what is left is aborted when the engines shut down; the exit status is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from ember.backend import ModelBackend
from ember.cluster.controller import Controller, ControllerConfig
from ember.cluster.state import Deployment
from ember.server.admin import add_admin_routes
from ember.server.app import STARTING, ServerState, create_app
from ember.server.metrics import ClusterMetrics
from ember.server.settings import DEFAULT_MODEL, ServeSettings

log = logging.getLogger("ember.serve")

ImportProgress = Callable[[str, int, int], None]  # (stage, done, total)
ProgressFactory = Callable[[], AbstractContextManager[ImportProgress]]


@contextlib.contextmanager
def logged_progress() -> Iterator[ImportProgress]:
    """Progress as log lines, one per stage (when there is no terminal for a bar)."""
    from ember.store.import_progress import percent

    seen: set[str] = set()

    def update(stage: str, done: int, total: int) -> None:
        if stage not in seen:
            seen.add(stage)
            pct = percent(done, total)
            log.info("first run: %s%s", stage, "" if pct is None else f" ({pct}% of the import done)")

    yield update


def import_note(done: int, total: int) -> str:
    """What a 503 says while the first run imports the model."""
    from ember.store.import_progress import percent

    pct = percent(done, total)
    return "importing the model" if pct is None else f"importing the model, {pct}% done"


def reporting_to(state: ServerState, progress: ProgressFactory) -> ProgressFactory:
    """`progress` (the console's bar or log lines), also written into `state` so
    that /health and every other route's 503 say how far the import is."""

    @contextlib.contextmanager
    def factory() -> Iterator[ImportProgress]:
        with progress() as show:

            def update(stage: str, done: int, total: int) -> None:
                show(stage, done, total)
                state.startup_stage = import_note(done, total)

            state.startup_stage = import_note(0, 0)
            try:
                yield update
            finally:
                state.startup_stage = STARTING

    return factory


def model_id(ref: str) -> str:
    """The id clients send: the store name, or a checkpoint directory's name."""
    path = Path(ref).expanduser()
    return path.name if path.is_dir() else ref


def prepare_models(settings: ServeSettings, progress: ProgressFactory = logged_progress) -> list[str]:
    """The store names of the models to serve: the default model is imported on first
    run; a checkpoint directory outside the store is copied into it (verified), since
    the store is the nodes' registry when no --registry is given."""
    from ember.store.importer import ensure_default_model
    from ember.store.local import LocalStore
    from ember.store.registry import DirectorySource
    from ember.store.transfer import copy_checkpoint

    store = LocalStore()
    names = []
    for ref in settings.models:
        if ref == DEFAULT_MODEL and not store.exists(ref):
            log.info("importing %s into the store (first run)", ref)
            with progress() as update:
                ensure_default_model(store, progress=update)
        name = model_id(ref)
        path = Path(ref).expanduser()
        if path.is_dir() and not store.exists(name) and not settings.registry:
            log.info("copying %s into the store as %s", path, name)
            copy_checkpoint(DirectorySource(path), store.path_for(name))
            store.register(name, source=str(path))
        names.append(name)
    return names


def start_cluster(
    settings: ServeSettings,
    loop: asyncio.AbstractEventLoop,
    metrics: ClusterMetrics | None = None,
    progress: ProgressFactory = logged_progress,
) -> ModelBackend:
    """Nodes, the controller and a deployment (min 1 instance) per model, started on
    `loop` (the server's); returns once every minimum instance is ready. With
    `settings.ray` the controller is an actor on Ray (start_ray_cluster)."""
    from ember.cluster.node import EmbeddedNode
    from ember.store.local import LocalStore
    from ember.store.registry import DirectoryRegistry, Registry, open_registry

    names = prepare_models(settings, progress)
    if settings.ray:
        return start_ray_cluster(settings, names, loop, metrics)
    registry: Registry = (
        open_registry(settings.registry) if settings.registry else DirectoryRegistry(LocalStore().root)
    )
    nodes = [
        EmbeddedNode(f"node{i}", registry, slots=settings.slots, engine_options=settings.engine_options())
        for i in range(settings.nodes)
    ]
    controller = Controller(
        nodes,
        policy=settings.placement,
        config=ControllerConfig(
            start_timeout_s=settings.start_timeout_s, max_model_len=settings.max_model_len
        ),
        events=metrics,
    )
    deployments = [Deployment(name, name, min_instances=1) for name in names]
    asyncio.run_coroutine_threadsafe(controller.start(deployments), loop).result()
    wait = controller.wait_ready(settings.start_timeout_s)
    asyncio.run_coroutine_threadsafe(wait, loop).result()
    for name in names:
        log.info("model %s ready", name)
    return controller


def start_ray_cluster(
    settings: ServeSettings,
    names: list[str],
    loop: asyncio.AbstractEventLoop,
    metrics: ClusterMetrics | None = None,
) -> ModelBackend:
    """The controller as a named actor on this (the head) node, over one node agent per
    Ray node; the store (or --registry) is the registry the nodes fetch from."""
    from ember.cluster.ray_cluster import NAMESPACE
    from ember.cluster.ray_controller import RayBackend, RayControllerConfig
    from ember.cluster.ray_node import import_ray
    from ember.env import ember_home
    from ember.store.local import LocalStore

    ray = import_ray()
    if not ray.is_initialized():
        ray.init(address=settings.ray, namespace=NAMESPACE, logging_level=logging.WARNING)
    config = RayControllerConfig(
        home=str(ember_home()),
        registry=settings.registry or str(LocalStore().root),
        engine_options=settings.engine_options(),
        policy=settings.placement,
        start_timeout_s=settings.start_timeout_s,
        max_model_len=settings.max_model_len,
        default_slots=settings.slots,
        deployments=tuple(Deployment(name, name, min_instances=1) for name in names),
    )
    backend = RayBackend.spawn(config, metrics)
    asyncio.run_coroutine_threadsafe(backend.start(settings.start_timeout_s), loop).result()
    for name in names:
        log.info("model %s ready on Ray", name)
    return backend


def build_app(settings: ServeSettings, progress: ProgressFactory = logged_progress) -> FastAPI:
    """The app, with a lifespan that starts the control plane in a thread after the
    socket is up; the admin routes are mounted under the same API key."""
    app = create_app(
        api_key=settings.api_key, max_body_bytes=settings.max_body_bytes, max_in_flight=settings.max_in_flight
    )
    add_admin_routes(app)
    state: ServerState = app.state.ember
    metrics = ClusterMetrics(app.state.metrics.registry)

    def load(loop: asyncio.AbstractEventLoop) -> None:
        try:
            state.backend = start_cluster(settings, loop, metrics, reporting_to(state, progress))
        except Exception as exc:
            state.startup_error = exc
            log.error("start-up failed: %s", exc)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loader = threading.Thread(target=load, args=(loop,), name="ember-loader", daemon=True)
        loader.start()
        try:
            yield
        finally:
            state.draining = True
            await asyncio.to_thread(loader.join, 60)
            if state.backend is not None:
                await state.backend.close()

    app.router.lifespan_context = lifespan
    return app


def serve(settings: ServeSettings, sock: socket.socket, progress: ProgressFactory = logged_progress) -> None:
    """Run the server on `sock` (server.listen.listen) in the foreground until SIGTERM
    or Ctrl-C."""
    if settings.ray:
        from ember.cluster.ray_cluster import NAMESPACE
        from ember.cluster.ray_node import import_ray

        # Here, in the main thread: joining a cluster installs signal handlers.
        import_ray().init(address=settings.ray, namespace=NAMESPACE, logging_level=logging.WARNING)
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
    uvicorn.Server(config).run(sockets=[sock])
