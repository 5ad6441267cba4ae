"""`ember serve` fails at once, before it loads anything, on a bad setting or a port
in use; every setting has its flag."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.cli.serve import serve_cmd
from ember.server.settings import SETTINGS
from tests.cli.test_imports import HEAVY, imported

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another socket listens on for the test's length."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def serve(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ember", "serve", *args],
        env={**os.environ, "EMBER_HOME": str(home)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


def test_a_port_in_use_fails_at_once_without_loading_anything(busy_port: int, ember_home: Path) -> None:
    done = serve("--port", str(busy_port), home=ember_home)
    assert done.returncode == 1
    assert messages(done.stderr) == [
        f"error: port {busy_port} on 127.0.0.1 is in use (another `ember serve`?): stop it, or pick "
        "another port with --port"
    ]
    assert not imported(done.stderr) & set(HEAVY)  # no model loaded: not even torch imported
    assert not (ember_home / "store").exists()


def test_a_bad_scheduler_fails_before_the_port_is_bound(busy_port: int, ember_home: Path) -> None:
    # the port is in use too: the error is the scheduler's, so it came first
    done = serve("--port", str(busy_port), "--scheduler", "mflq", home=ember_home)
    assert done.returncode == 1
    assert messages(done.stderr) == [
        "error: bad setting scheduler='mflq' (from --scheduler): "
        "Input should be 'mlfq', 'fcfs', 'srpt' or 'gittins'"
    ]


def test_every_setting_has_its_flag() -> None:
    params = set(inspect.signature(serve_cmd).parameters)
    assert params == {*SETTINGS, "config"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [("index.json", "not valid JSON"), ("part-00000.bin", "checksum mismatch")],
)
def test_a_corrupt_model_stops_the_server_and_it_exits_1_with_the_reason(
    tiny_llama: tuple[Path, Any], ember_home: Path, corrupt: str, reason: str
) -> None:
    import shutil

    from ember.store.local import LocalStore

    store = LocalStore(ember_home)
    shutil.copytree(tiny_llama[0], store.path_for("tiny"))
    store.register("tiny")
    path = store.path_for("tiny") / corrupt
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(b"{not json" if corrupt == "index.json" else bytes(data))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "ember", "serve", "--model", "tiny", "--port", str(port),
         "--kv-cache-bytes", str(8 << 20), "--max-model-len", "256", "--log-level", "warning"],
        env={**os.environ, "EMBER_HOME": str(ember_home)}, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model 'tiny' failed: ") and reason in last, done.stderr
