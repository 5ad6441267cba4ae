"""A registry over loopback HTTP for benchmarks: the store's RegistryServer, run in
its own process so its I/O does not share the benchmarked server's interpreter.

Run as `python -m ember.bench.registry_server ROOT [LINK_BPS]`: it prints its base
URL on the first line of stdout and serves ROOT until terminated, behind a link of
LINK_BPS bytes a second if given. `serve_registry(root, link_bps)` does that and
yields the URL.
"""

from __future__ import annotations

import sys
import threading
from contextlib import AbstractContextManager
from pathlib import Path

from ember.bench.child_server import child_server
from ember.store.registry_server import RegistryServer


def serve_registry(root: Path, link_bps: float | None = None) -> AbstractContextManager[str]:
    """Serve directory `root` over HTTP on 127.0.0.1 from a child process, behind a link
    of `link_bps` bytes a second if given; yields its URL."""
    return child_server("ember.bench.registry_server", str(root), *([repr(link_bps)] if link_bps else []))


def main(argv: list[str]) -> None:
    server = RegistryServer(Path(argv[0]), link_bps=float(argv[1]) if len(argv) > 1 else None)
    print(server.url, flush=True)
    threading.Event().wait()  # serve until terminated


if __name__ == "__main__":
    main(sys.argv[1:])
