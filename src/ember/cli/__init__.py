"""The `ember` command line: `ember serve`, `ember chat`, `ember deploy/delete/status`,
`ember store ...`, `ember bench ...`.

Every EmberError a command raises is printed as `error: ...` on stderr with exit
status 1; anything else is a bug and keeps its traceback (see cli/base.py).

Importing this package imports no torch, transformers or ray: each command imports
what it needs when it runs, so the client commands and every `--help` start fast
(tests/cli/test_imports.py checks it).
"""

from __future__ import annotations

from ember.cli.base import EmberTyper

app = EmberTyper(
    help="Ember: serverless LLM inference with fast cold starts.",
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from ember.cli.bench import bench_app
    from ember.cli.chat import chat_cmd
    from ember.cli.cluster import delete_cmd, deploy_cmd, status_cmd
    from ember.cli.serve import serve_cmd
    from ember.cli.store import store_app

    app.command("serve")(serve_cmd)
    app.command("chat")(chat_cmd)
    app.command("deploy")(deploy_cmd)
    app.command("delete")(delete_cmd)
    app.command("status")(status_cmd)
    app.add_typer(store_app, name="store")
    app.add_typer(bench_app, name="bench")
    import ember.cli.bench_serve  # noqa: F401  (registers `ember bench serve` on bench_app)


_register()


def main() -> None:
    """Entry point of the `ember` script."""
    app()


__all__ = ["app", "main"]
