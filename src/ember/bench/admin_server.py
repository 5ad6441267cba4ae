"""A server for `ember bench cli` to run `ember status` against: Ember's app with the
admin API over a control plane of one node and no deployments (the create_app +
admin routes + Controller + EmbeddedNode that `ember serve` builds, with no model to
load), in a child process with its own EMBER_HOME.

Run as `python -m ember.bench.admin_server HOME`: it prints its base URL on the first
line of stdout once /admin/status answers, and serves until terminated.
`serve_admin(home)` does that and yields the URL.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from pathlib import Path

from ember import env
from ember.bench.child_server import child_server

_PROBE_BYTES = 1 << 20  # the node's bandwidth probe at start-up: small, nothing is loaded


def serve_admin(home: Path) -> AbstractContextManager[str]:
    """Run the server in a child process on a free loopback port; yields its URL."""
    return child_server("ember.bench.admin_server", str(home), stop_timeout_s=30)


def main(home: Path) -> None:
    import uvicorn
    from fastapi import FastAPI

    from ember.cluster.controller import Controller
    from ember.cluster.node import EmbeddedNode
    from ember.cluster.state import ClusterState
    from ember.server.admin import add_admin_routes
    from ember.server.app import create_app
    from ember.server.listen import listen
    from ember.store.local import LocalStore
    from ember.store.registry import DirectoryRegistry

    os.environ[env.EMBER_HOME] = str(home)
    sock = listen("127.0.0.1", 0)
    app = create_app()
    add_admin_routes(app)
    node = EmbeddedNode("node0", DirectoryRegistry(LocalStore().root), home=home, probe_bytes=_PROBE_BYTES)
    controller = Controller([node], state=ClusterState(home / "cluster.db"), model_root=home / "models")
    host, port = sock.getsockname()[:2]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await controller.start()
        app.state.ember.backend = controller
        print(f"http://{host}:{port}", flush=True)  # ready: /admin/status answers
        try:
            yield
        finally:
            await controller.close()

    app.router.lifespan_context = lifespan
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
