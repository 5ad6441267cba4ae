"""The server `ember bench cold` measures: Ember's HTTP app with its control plane
(the same create_app + admin routes + Controller + EmbeddedNode that `ember serve`
builds) on a free loopback port in this process, with its own home (state, node
tiers) so the benchmark never touches the user's deployments, and a registry over
HTTP.

Deployments have min-instances 0 and a short keep-alive: the controller scales them
to zero by itself between runs. The tier of the next cold start is chosen by what
the node still holds: its DRAM pool (a DRAM hit), its disk cache with the page
cache dropped (disk), or neither (registry).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI

from ember.bench.page_cache import evict_page_cache
from ember.cluster.controller import Controller, ControllerConfig
from ember.cluster.node import EmbeddedNode
from ember.cluster.state import ClusterState, LoadRecord
from ember.errors import EmberError
from ember.server.admin import add_admin_routes
from ember.server.app import create_app
from ember.server.metrics import ClusterMetrics
from ember.store.registry import HttpRegistry

T = TypeVar("T")
Tier = Literal["dram", "disk", "registry"]
TICK_S = 0.2  # autoscaler period: an idle instance goes within keep-alive + this


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


class BenchServer:
    """Ember's HTTP app over `controller` at `url` (a free loopback port), served by
    uvicorn on a thread of its own with its own event loop, as `ember serve` serves it.
    A context manager: entering starts the server and the controller; leaving closes
    both and `registry`. Deployments made through it have min-instances 0 and its
    keep-alive."""

    def __init__(
        self, controller: Controller, registry: HttpRegistry, app: FastAPI, *, keep_alive_s: float = 1.0
    ) -> None:
        self.controller, self.registry, self.app = controller, registry, app
        self.keep_alive_s = keep_alive_s
        self.app.state.ember.backend = self.controller
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ember-bench-server", daemon=True)
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.url = ""
        self._serving: concurrent.futures.Future[None] | None = None
        self.http = httpx.Client(timeout=httpx.Timeout(600.0))

    def __enter__(self) -> Self:
        self._sock.bind(("127.0.0.1", 0))
        host, port = self._sock.getsockname()
        self.url = f"http://{host}:{port}"
        self._thread.start()
        self._serving = asyncio.run_coroutine_threadsafe(self._server.serve(sockets=[self._sock]), self._loop)
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise EmberError("the benchmark's Ember server did not start")
            time.sleep(0.02)
        self._run(self.controller.start())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._run(self.controller.close())
        finally:
            self._server.should_exit = True
            if self._serving is not None:
                with contextlib.suppress(Exception):
                    self._serving.result(timeout=30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            if not self._thread.is_alive():
                self._loop.close()
            self._sock.close()
            self.http.close()
            self.registry.close()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.submit(work).result()

    def submit(self, work: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `work` on the server's event loop (where the controller lives)."""
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    # -- through the admin API --------------------------------------------------------

    def deploy(self, model: str, max_instances: int = 1) -> None:
        """A deployment named `model`: min-instances 0, this server's keep-alive."""
        body = {
            "model": model, "min_instances": 0, "max_instances": max_instances,
            "keep_alive_s": self.keep_alive_s,
        }  # fmt: skip
        resp = self.http.post(f"{self.url}/admin/deployments", json=body)
        if resp.status_code != 201:
            raise EmberError(f"deploying {model} failed: HTTP {resp.status_code} {resp.text[:200]}")

    def wait_scaled_to_zero(self, timeout_s: float = 120.0) -> None:
        """Until no deployment has a live instance and every slot is free (polls /admin/status)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.http.get(f"{self.url}/admin/status").json()
            live = sum(len(d["instances"]) for d in status["deployments"])
            busy = sum(n["slots"] - n["free_slots"] for n in status["nodes"])
            if live == 0 and busy == 0:
                return
            if time.monotonic() > deadline:
                raise EmberError(f"still {live} live instances after {timeout_s:g} s")
            time.sleep(0.05)


class ColdServer(BenchServer):
    """An Ember server at `url` with one node (one slot) fetching from `registry_url`,
    whose directory is `registry_root` (for dropping its page cache). A context manager."""

    def __init__(
        self,
        home: Path,
        registry_url: str,
        registry_root: Path,
        *,
        keep_alive_s: float = 1.0,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        self.home, self.registry_root = home, registry_root
        registry = HttpRegistry(registry_url)
        self.node = EmbeddedNode("node0", registry, home=home, engine_options=engine_options)
        app = create_app()
        add_admin_routes(app)
        controller = Controller(
            [self.node],
            state=ClusterState(home / "cluster.db"),
            config=ControllerConfig(tick_s=TICK_S),
            events=ClusterMetrics(app.state.metrics.registry),
            model_root=home / "cluster" / "models",
        )
        super().__init__(controller, registry, app, keep_alive_s=keep_alive_s)

    # -- choosing the tier of the next cold start -------------------------------------

    def prepare(self, model: str, tier: Tier) -> None:
        """Make the next start of `model` come from `tier` (no instance may be running):
        dram: the node's DRAM pool must hold it (a previous instance left it there);
        disk: drop it from DRAM and the disk cache's files from the page cache;
        registry: drop it from DRAM and the disk cache, and the registry's files from
        the page cache (a cold fetch end to end)."""
        store = self.node.store
        if tier == "dram":
            if "dram" not in store.holds(model):
                raise EmberError(f"{model} is not in the node's DRAM pool: start it once first")
            return
        if "dram" in store.holds(model) and not store.evict(model):
            raise EmberError(f"{model} is still leased from the DRAM pool")
        if tier == "disk":
            path = store.disk.path(model)
            if path is None:
                raise EmberError(f"{model} is not in the node's disk cache: start it once first")
            evict_page_cache(files_under(path))
            return
        if store.disk.path(model) is not None and not store.disk.evict(model):
            raise EmberError(f"{model} is being read from the node's disk cache")
        evict_page_cache(files_under(self.registry_root / model))

    def last_load(self) -> LoadRecord | None:
        """The most recent instance start: its tier, bytes, start-up seconds."""
        loads = self.controller.state.loads(limit=1)
        return loads[-1] if loads else None

    def next_load(self, before: LoadRecord | None, timeout_s: float = 60.0) -> LoadRecord | None:
        """The first load recorded after `before`: an instance that streams its weights
        serves before its load is recorded (polls; None past the timeout)."""
        deadline = time.monotonic() + timeout_s
        while (load := self.last_load()) is None or (before is not None and load.instance == before.instance):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        return load
