"""`ember serve` as a user runs it: a real process on a free 127.0.0.1 port, with its
own EMBER_HOME, output kept, stopped with a kill by the test that started it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class ServeProcess:
    """A running `ember serve`: its process, base URL, EMBER_HOME and output so far."""

    proc: subprocess.Popen[str]
    url: str
    home: Path
    log: list[str] = field(default_factory=list)
    health_seen: list[int] = field(default_factory=list)  # /health's statuses while starting
    health_messages: list[str] = field(default_factory=list)  # and the "message" of each answer
    reader: threading.Thread | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(home: Path) -> ServeProcess:
    """`ember serve` on a free port with EMBER_HOME=home, once /health answers 200 (the
    answers seen on the way are kept); the caller stops it with stop_server()."""
    port = free_port()
    env = {**os.environ, "EMBER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("EMBER_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "serve", "--port", str(port), "--shutdown-grace-s", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    server = ServeProcess(proc, f"http://127.0.0.1:{port}", home)
    server.reader = threading.Thread(
        target=lambda: server.log.extend(iter(proc.stdout.readline, "")), daemon=True
    )  # type: ignore[union-attr]
    server.reader.start()
    try:
        deadline = time.monotonic() + 240
        while True:  # another process: poll its /health, with a deadline
            assert proc.poll() is None, "ember serve exited:\n" + "".join(server.log)
            assert time.monotonic() < deadline, "not ready in 240 s:\n" + "".join(server.log)
            try:
                health = httpx.get(f"{server.url}/health", timeout=2)
                status = health.status_code
                server.health_seen.append(status)
                server.health_messages.append(health.json().get("message", ""))
                if status == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    except BaseException:
        stop_server(server)
        raise


def stop_server(server: ServeProcess) -> None:
    """Kill the server if it still runs, and wait for it and its output reader."""
    if server.proc.poll() is None:
        server.proc.kill()
    server.proc.wait(timeout=30)
    if server.reader is not None:
        server.reader.join(timeout=10)
    server.proc.stdout.close()  # type: ignore[union-attr]
