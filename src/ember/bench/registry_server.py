"""A registry over loopback HTTP for benchmarks: the store's RegistryServer, run in
its own process so its I/O does not share the benchmarked server's interpreter.

Run as `python -m ember.bench.registry_server ROOT`: it prints its base URL on the
first line of stdout and serves ROOT until terminated. `serve_registry(root)` does
that and yields the URL.
"""

from __future__ import annotations

import sys
import threading
from contextlib import AbstractContextManager
from pathlib import Path

from ember.bench.child_server import child_server
from ember.store.registry_server import RegistryServer


def serve_registry(root: Path) -> AbstractContextManager[str]:
    """Serve directory `root` over HTTP on 127.0.0.1 from a child process; yields its URL."""
    return child_server("ember.bench.registry_server", str(root))


def main(argv: list[str]) -> None:
    server = RegistryServer(Path(argv[0]))
    print(server.url, flush=True)
    threading.Event().wait()  # serve until terminated


if __name__ == "__main__":
    main(sys.argv[1:])
