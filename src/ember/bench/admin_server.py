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
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from ember import env

_PROBE_BYTES = 1 << 20  # the node's bandwidth probe at start-up: small, nothing is loaded


@contextlib.contextmanager
def serve_admin(home: Path) -> Iterator[str]:
    """Run the server in a child process on a free loopback port; yields its URL."""
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.bench.admin_server", str(home)],
        stdout=subprocess.PIPE,
        env=child_env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the admin server did not start (exit status {proc.poll()})")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


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
