"""`child_server`: a benchmark's helper server in a child process, so its work does
not share the benchmarked interpreter. The child prints its base URL on the first line
of stdout once it serves; the parent yields that URL and terminates the child after."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def child_server(module: str, *args: str, stop_timeout_s: float = 10.0) -> Iterator[str]:
    """Run `python -m module args...` with this process's import path; yields the URL it
    prints first. RuntimeError if it exits (or prints anything else) instead."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"{module} did not start (exit status {proc.poll()})")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
