"""The `ember` command line: `ember serve`, `ember chat`, `ember deploy/delete/status`,
`ember store ...`, `ember bench ...`, `ember sim`.

Every EmberError a command raises is printed as `error: ...` on stderr with exit
status 1; anything else is a bug and keeps its traceback (see cli/base.py).

Importing this package imports no torch, transformers or ray: each command imports
what it needs when it runs, so the client commands and every `--help` start fast
(tests/cli/test_imports.py checks it).
"""

from __future__ import annotations

from ember.cli.base import EmberTyper, LazyGroup


class _Commands(LazyGroup):
    # Each imported only when run (or listed by --help): a client command's start pays
    # for its own module alone.
    lazy = {  # noqa: RUF012
        "serve": "ember.cli.serve:serve_cmd",
        "chat": "ember.cli.chat:chat_cmd",
        "deploy": "ember.cli.cluster:deploy_cmd",
        "delete": "ember.cli.cluster:delete_cmd",
        "status": "ember.cli.cluster:status_cmd",
        "store": "ember.cli.store:store_app",
        "bench": "ember.cli.bench:bench_app",
        "sim": "ember.cli.sim:sim_cmd",
    }


app = EmberTyper(cls=_Commands, pretty_exceptions_enable=False)


@app.callback()
def _ember() -> None:
    """Ember: serverless LLM inference with fast cold starts."""


def main() -> None:
    """Entry point of the `ember` script."""
    app()


__all__ = ["app", "main"]
