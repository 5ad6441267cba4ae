"""A live Ember server on a free port, serving the tiny random Llama as `tiny`."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from ember.engine.async_engine import AsyncEngine
from ember.server.app import create_app
from tests.server.embedded_backend import EmbeddedBackend

API_KEY = "test-key"


@dataclass
class LiveServer:
    url: str
    app: Any
    engine: AsyncEngine

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def live_server(tiny_llama: tuple[Path, Any]) -> Iterator[LiveServer]:
    path, _ = tiny_llama
    engine = AsyncEngine.from_checkpoint(path, max_model_len=256, kv_cache_bytes=8 << 20)
    app = create_app(api_key=API_KEY, max_body_bytes=1 << 20)
    app.state.ember.backend = EmbeddedBackend({"tiny": engine}, created=int(time.time()))
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        host, port = sock.getsockname()
        yield LiveServer(f"http://{host}:{port}", app, engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.shutdown()
        sock.close()
