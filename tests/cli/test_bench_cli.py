"""`ember bench cli` once, one repeat: every command timed against the baseline, with a
server of its own (the admin API over one node, nothing loaded)."""

from __future__ import annotations

import json
import socket

import pytest
from typer.testing import CliRunner

from ember.cli import app


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_cli_times_every_command_against_the_baseline() -> None:
    result = CliRunner().invoke(app, ["bench", "cli", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    cases = {c["case"]: c for c in report["cases"]}
    assert list(cases) == [
        "python -c 'import typer, httpx'", "ember --help", "ember status (server)",
        "ember status (no server)",
    ]  # fmt: skip
    assert all(len(c["times_s"]) == 1 and c["median_s"] > 0 for c in cases.values())
    assert [t["name"] for t in report["targets"]] == [
        "ember --help / baseline", "ember status (server) / baseline", "ember status (no server) / baseline",
    ]  # fmt: skip
    assert report["server"] == "own"


def test_bench_cli_against_a_url_with_no_server_fails_clearly() -> None:
    # `ember status` against the given URL must exit 0 for its time to count
    with socket.socket() as sock:  # bound, not listening: connecting is refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        result = CliRunner().invoke(app, ["bench", "cli", "--repeats", "1", "--url", url])
    assert result.exit_code == 1
    assert "`ember status (server)` exited with 1, not 0" in result.stderr
