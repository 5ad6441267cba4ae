"""`ember bench cli`: how long the client commands take from start to exit, each a
fresh process as a user runs it, next to `python -c "import typer, httpx"` (the two
libraries every client command needs: the floor). Target: each within 2x of it.

Commands: `ember --help`; `ember status` against a running server (its own child
server with the admin API and nothing loaded, or --url); `ember status` with no
server (a port bound but not listening: the connection is refused at once; exit 1).
Runs are interleaved, one warm-up round first, the order rotated each round;
medians are reported. Children run with bytecode caching on (PYTHONDONTWRITEBYTECODE
dropped), as on a user's machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import EmberError

TARGET_RATIO = 2.0
# As a user's shell runs them: with compiled bytecode (the warm-up round writes it where
# an environment asked for none), so no run pays for compiling Ember's modules.
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
BASELINE = "python -c 'import typer, httpx'"


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]
    exit_status: int  # what the command must exit with for its time to count


@dataclass
class CliReport:
    repeats: int
    server: str  # "own" (a child admin server) or the --url given
    times_s: dict[str, list[float]] = field(default_factory=dict)  # case -> one time per repeat

    def median(self, case: str) -> float:
        return statistics.median(self.times_s[case])

    def targets(self) -> list[dict[str, Any]]:
        base = self.median(BASELINE)
        rows = []
        for case in self.times_s:
            if case != BASELINE:
                ratio = self.median(case) / base
                rows.append({"name": f"{case} / baseline", "ratio": ratio, "goal": TARGET_RATIO,
                             "met": ratio <= TARGET_RATIO})  # fmt: skip
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "repeats": self.repeats,
            "server": self.server,
            "python": sys.version.split()[0],
            "cases": [
                {"case": c, "median_s": self.median(c), "times_s": ts} for c, ts in self.times_s.items()
            ],
            "targets": self.targets(),
        }


def cases(up_url: str, down_url: str) -> list[Case]:
    py = sys.executable
    return [
        Case(BASELINE, (py, "-c", "import typer, httpx"), 0),
        Case("ember --help", (py, "-m", "ember", "--help"), 0),
        Case("ember status (server)", (py, "-m", "ember", "status", "--url", up_url), 0),
        Case("ember status (no server)", (py, "-m", "ember", "status", "--url", down_url), 1),
    ]


def time_case(case: Case) -> float:
    """Seconds from start to exit of one run; a wrong exit status is an EmberError."""
    start = time.perf_counter()
    done = subprocess.run(case.argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=_ENV)
    elapsed = time.perf_counter() - start
    if done.returncode != case.exit_status:
        raise EmberError(
            f"`{case.name}` exited with {done.returncode}, not {case.exit_status}: {done.stderr[-500:]}"
        )
    return elapsed


def run_cli_bench(
    url: str | None = None, repeats: int = 5, progress: Callable[[int, int], None] | None = None
) -> CliReport:
    """Time every case `repeats` times, interleaved, after one warm-up round."""
    with _server(url) as up_url, _refusing_port() as port:
        todo = cases(up_url, f"http://127.0.0.1:{port}")
        report = CliReport(repeats, url or "own", {c.name: [] for c in todo})
        for c in todo:  # warm-up: page cache, .pyc files, the server's first request
            time_case(c)
        for r in range(repeats):
            for c in todo[r % len(todo) :] + todo[: r % len(todo)]:
                report.times_s[c.name].append(time_case(c))
            if progress is not None:
                progress(r + 1, repeats)
    return report


@contextlib.contextmanager
def _server(url: str | None) -> Iterator[str]:
    if url is not None:
        yield url
        return
    from ember.bench.admin_server import serve_admin

    with tempfile.TemporaryDirectory(prefix="ember-bench-cli-") as home, serve_admin(Path(home)) as own:
        yield own


@contextlib.contextmanager
def _refusing_port() -> Iterator[int]:
    """A loopback port bound but not listening, held meanwhile: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
