"""A registry over loopback HTTP for benchmarks: the store's RegistryServer, run in
its own process so its I/O does not share the benchmarked server's interpreter.

Run as `python -m ember.bench.registry_server ROOT`: it prints its base URL on the
first line of stdout and serves ROOT until terminated. `serve_registry(root)` does
that and yields the URL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ember.store.registry_server import RegistryServer


@contextmanager
def serve_registry(root: Path) -> Iterator[str]:
    """Serve directory `root` over HTTP on 127.0.0.1 from a child process; yields its URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.bench.registry_server", str(root)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the registry server did not start (exit status {proc.poll()})")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def main(argv: list[str]) -> None:
    server = RegistryServer(Path(argv[0]))
    print(server.url, flush=True)
    threading.Event().wait()  # serve until terminated


if __name__ == "__main__":
    main(sys.argv[1:])
