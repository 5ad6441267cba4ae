"""Every `ember` command's --help, and `ember status` / `ember chat` with no server,
each as a fresh process of this interpreter: exit 0 with a usage line, or exit 1
with a one-line `error: ...`, never a traceback.

CI runs it from a venv with Ember installed without extras (.ci/run), so a command
that needs a test tool or an optional package to start fails here.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import typer


def commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    ctx = typer.Context(group)
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)  # the top group imports its commands when asked
        yield (*path, name)
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*path, name))


def ember(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ember", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def main() -> int:
    import typer

    from ember.cli import app

    failures = []
    paths = [(), *commands(typer.main.get_command(app))]
    for path in paths:
        done = ember(*path, "--help")
        if done.returncode != 0 or "Usage:" not in done.stdout or "Traceback" in done.stderr:
            failures.append(f"ember {' '.join(path)} --help: exit {done.returncode}\n{done.stderr[-2000:]}")
    with socket.socket() as sock:  # bound, not listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for args in (["status", "--url", url], ["chat", "--url", url]):
            done = ember(*args)
            if done.returncode != 1 or not done.stderr.startswith("error: no Ember server at"):
                failures.append(f"ember {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    print(f"cli_smoke: {len(paths) + 2 - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
