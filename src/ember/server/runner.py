"""`ember serve`: serve on the socket bound at once (server/listen.py), load the models
in the background, serve until SIGTERM / Ctrl-C, then drain.

Start-up: uvicorn serves the socket and answers /health with 503 while a loader thread imports
the default model on first run (with a progress bar on the console), then the
control plane starts: `--nodes` embedded nodes of `--slots` instances each, one
deployment per model with one instance always up; /health turns 200 when those are
ready (its body gives each model's state). A start-up that fails, or a model that
fails for a reason no retry can fix (a missing or corrupt checkpoint, a full disk),
stops the server the same clean way, and `ember serve` exits 1 with the reason.
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

import uvicorn
from fastapi import FastAPI

from ember.backend import ModelBackend, ModelState
from ember.cluster.controller import Controller, ControllerConfig
from ember.cluster.state import Deployment
from ember.errors import StartFailedError
from ember.server.admin import add_admin_routes
from ember.server.app import STARTING, ServerState, create_app
from ember.server.metrics import ClusterMetrics
from ember.server.settings import DEFAULT_MODEL, ServeSettings

log = logging.getLogger("ember.serve")

T = TypeVar("T")
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


def reporting_to(state: ServerState, progress: ProgressFactory, model: str) -> ProgressFactory:
    """`progress` (the console's bar or log lines) of importing `model`, also written
    into `state` so that /health (`model` "importing", with its percent) and every
    other route's 503 say how far the import is."""
    from ember.store.import_progress import percent

    @contextlib.contextmanager
    def factory() -> Iterator[ImportProgress]:
        with progress() as show:

            def update(stage: str, done: int, total: int) -> None:
                show(stage, done, total)
                state.startup_stage = import_note(done, total)
                state.imports[model] = ModelState("importing", progress=percent(done, total))

            state.startup_stage = import_note(0, 0)
            state.imports[model] = ModelState("importing")
            try:
                yield update
            finally:
                state.startup_stage = STARTING
                state.imports.pop(model, None)

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


async def start_cluster(
    settings: ServeSettings, names: list[str], state: ServerState, metrics: ClusterMetrics | None = None
) -> ModelBackend:
    """Nodes, the controller and a deployment (min 1 instance) per model; returns once
    every minimum instance is ready or failed for good, or the start timeout passed
    (starts still under way go on). Each model's state is in `state.live_states` from
    the moment the controller exists. With `settings.ray` the controller is an actor
    on Ray (start_ray_cluster)."""
    from ember.cluster.node import EmbeddedNode
    from ember.store.local import LocalStore
    from ember.store.registry import DirectoryRegistry, Registry, open_registry

    if settings.ray:
        return await start_ray_cluster(settings, names, state, metrics)
    registry: Registry = (
        open_registry(settings.registry) if settings.registry else DirectoryRegistry(LocalStore().root)
    )
    nodes = [
        EmbeddedNode(
            f"node{i}",
            registry,
            slots=settings.slots,
            engine_options=settings.engine_options(),
            dram_budget=settings.dram_bytes,
            disk_budget=settings.disk_bytes,
        )
        for i in range(settings.nodes)
    ]
    controller = Controller(
        nodes,
        policy=settings.placement,
        config=ControllerConfig(
            start_timeout_s=settings.start_timeout_s,
            max_model_len=settings.max_model_len,
            migrate=not settings.no_migration,
        ),
        events=metrics,
    )
    try:
        state.live_states = controller.model_states
        await controller.start([Deployment(name, name, min_instances=1) for name in names])
        await _until_settled(controller.wait_ready(settings.start_timeout_s), settings.start_timeout_s)
    except BaseException:
        await controller.close()
        raise
    return controller


async def start_ray_cluster(
    settings: ServeSettings, names: list[str], state: ServerState, metrics: ClusterMetrics | None = None
) -> ModelBackend:
    """The controller as a named actor on this (the head) node, over one node agent per
    Ray node; the store (or --registry) is the registry the nodes fetch from."""
    from ember.cluster.ray_controller import RayBackend, RayControllerConfig
    from ember.env import ember_home
    from ember.store.local import LocalStore

    config = RayControllerConfig(
        home=str(ember_home()),
        registry=settings.registry or str(LocalStore().root),
        engine_options=settings.engine_options(),
        policy=settings.placement,
        start_timeout_s=settings.start_timeout_s,
        max_model_len=settings.max_model_len,
        default_slots=settings.slots,
        dram_budget=settings.dram_bytes,
        disk_budget=settings.disk_bytes,
        migrate=not settings.no_migration,
        deployments=tuple(Deployment(name, name, min_instances=1) for name in names),
    )
    backend = RayBackend.spawn(config, metrics)
    try:
        state.live_states = backend.model_states
        await _until_settled(backend.start(settings.start_timeout_s), settings.start_timeout_s)
    except BaseException:
        await backend.close()
        raise
    return backend


async def _until_settled(ready: Awaitable[None], timeout_s: float) -> None:
    try:
        await ready
    except TimeoutError:
        log.warning("not every model is ready after %g s; their starts go on", timeout_s)


def prepare(settings: ServeSettings, progress: ProgressFactory) -> list[str]:
    """The blocking part of the start-up (on a thread): the models into the store, and
    with --ray this process into the Ray cluster."""
    names = prepare_models(settings, progress)
    if settings.ray:
        from ember.cluster.ray_cluster import NAMESPACE
        from ember.cluster.ray_node import import_ray

        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=settings.ray, namespace=NAMESPACE, logging_level=logging.WARNING)
    return names


def why_failed(state: ServerState) -> str | None:
    """Why `ember serve` must stop: its start-up failed, or one of its models failed
    for a reason no retry can fix. None while every model serves or may yet."""
    if state.startup_error is not None:
        return f"the server failed to start: {state.startup_error}"
    for name, model in state.model_states().items():
        if model.state == "failed":
            return f"model {name!r} failed: {model.reason}"
    return None


async def watch_failures(
    state: ServerState, on_failed: Callable[[], None], settled: asyncio.Event, period_s: float = 1.0
) -> None:
    """Once the start-up or a model failed for good: record why (`state.exit_reason`)
    and call `on_failed` (which stops the server). Checked the moment the start-up has
    `settled` and every `period_s` (a model may fail later too: its instance died and
    no new one can start)."""
    while (reason := why_failed(state)) is None:
        if settled.is_set():
            await asyncio.sleep(period_s)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), period_s)
    state.exit_reason = reason
    log.error("stopping: %s", reason)
    on_failed()


def build_app(
    settings: ServeSettings,
    progress: ProgressFactory = logged_progress,
    on_failed: Callable[[], None] = lambda: None,
) -> FastAPI:
    """The app, with a lifespan that starts the control plane after the socket is up;
    the admin routes are mounted too. When the start-up or a model fails for good,
    `on_failed` is called (serve() stops the server with it and exits non-zero)."""
    api_key, admin_key = settings.keys()
    app = create_app(
        api_key=api_key, admin_key=admin_key, max_body_bytes=settings.max_body_bytes,
        max_in_flight=settings.max_in_flight,
    )  # fmt: skip
    add_admin_routes(app)
    state: ServerState = app.state.ember
    state.models = [model_id(ref) for ref in settings.models]
    metrics = ClusterMetrics(app.state.metrics.registry)

    async def start_up(settled: asyncio.Event) -> None:
        try:
            names = await on_thread(lambda: prepare(settings, reporting_to(state, progress, DEFAULT_MODEL)))
            state.backend = await start_cluster(settings, names, state, metrics)
            for name, model in state.model_states().items():
                log.log(logging.ERROR if model.state == "failed" else logging.INFO, "model %s %s%s",
                        name, model.state, f": {model.reason}" if model.reason else "")  # fmt: skip
        except Exception as exc:
            state.startup_error = exc
            log.error("start-up failed: %s", exc)
        finally:
            settled.set()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        settled = asyncio.Event()  # the start-up is over: a backend, or why there is none
        starting = asyncio.create_task(start_up(settled))
        watching = asyncio.create_task(watch_failures(state, on_failed, settled))
        try:
            yield
        finally:
            state.draining = True
            for task in (watching, starting):  # a start still under way closes what it started
                task.cancel()
            await asyncio.gather(starting, watching, return_exceptions=True)
            if state.backend is not None:
                await state.backend.close()

    app.router.lifespan_context = lifespan
    return app


def on_thread(work: Callable[[], T]) -> Awaitable[T]:
    """`work` on a daemon thread (a first-run import is not interrupted: the process
    may exit under it), awaited on this loop; cancelling the await leaves it be."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = work(), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="ember-loader", daemon=True).start()
    return done


def serve(settings: ServeSettings, sock: socket.socket, progress: ProgressFactory = logged_progress) -> None:
    """Run the server on `sock` (server.listen.listen) in the foreground until SIGTERM
    or Ctrl-C; StartFailedError (after a clean shutdown) when the start-up or one of
    its models failed for good."""
    if settings.ray:
        from ember.cluster.ray_cluster import NAMESPACE
        from ember.cluster.ray_node import import_ray

        # Here, in the main thread: joining a cluster installs signal handlers.
        import_ray().init(address=settings.ray, namespace=NAMESPACE, logging_level=logging.WARNING)
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(settings, progress, on_failed=stop)
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
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    reason = app.state.ember.exit_reason
    if reason is not None:
        raise StartFailedError(reason)
