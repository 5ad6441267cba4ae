"""The client commands and every --help start without torch, transformers, ray or
numpy: each run here is a fresh `python -X importtime -m ember ...`, as a user's shell
runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

HEAVY = ("torch", "transformers", "ray", "openai", "numpy")


def imported(stderr: str) -> set[str]:
    """Top-level packages in a `python -X importtime` report."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback port bound but not listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def ember(*args: str, home: Path, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBER_HOME": str(home)}
    if url is not None:
        env["EMBER_URL"] = url
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ember", *args],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [["--help"], ["status", "--help"], ["deploy", "--help"], ["store", "ls", "--help"], ["serve", "--help"],
     ["chat", "--help"], ["bench", "cold", "--help"], ["bench", "cli", "--help"],
     ["bench", "cost", "--help"], ["sim", "--help"], ["bench", "cluster", "--help"]],
    ids=" ".join,
)  # fmt: skip
def test_help_imports_no_heavy_package(args: list[str], ember_home: Path) -> None:
    done = ember(*args, home=ember_home)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage" in done.stdout
    assert not imported(done.stderr) & set(HEAVY)


@pytest.mark.parametrize("args", [["--help"], ["status", "--help"]], ids=" ".join)
def test_client_commands_import_no_pydantic(args: list[str], ember_home: Path) -> None:
    # typer 0.29 imports pydantic (0.1 s) to run any command, so Ember takes an earlier
    # typer; `ember serve`'s settings validate with pydantic only when it starts
    done = ember(*args, home=ember_home)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pydantic" not in imported(done.stderr)


def test_a_command_imports_its_own_module_alone(refused_url: str) -> None:
    # (importtime does not see importlib.import_module, which loads the commands: ask
    # the process itself)
    code = (
        f"import sys; sys.argv = ['ember', 'status', '--url', {refused_url!r}]\n"
        "from ember.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(*sorted(m for m in sys.modules if m.startswith('ember.')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    modules = set(done.stdout.split())
    assert "ember.cli.cluster" in modules, done.stderr[-2000:]
    assert not modules & {"ember.cli.serve", "ember.cli.bench", "ember.cli.store", "ember.server.settings"}


def test_store_ls_on_an_empty_home_imports_no_heavy_package(ember_home: Path) -> None:
    done = ember("store", "ls", home=ember_home)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "name" in done.stdout and "size" in done.stdout
    assert not imported(done.stderr) & set(HEAVY)


def test_status_with_no_server_is_a_clear_error(ember_home: Path, refused_url: str) -> None:
    done = ember("status", home=ember_home, url=refused_url)
    assert done.returncode == 1
    message = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert message == [f"error: no Ember server at {refused_url} (start one with `ember serve`)"]
    assert not imported(done.stderr) & set(HEAVY)


def test_python_m_ember_cli_still_works(ember_home: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "Usage" in done.stdout
