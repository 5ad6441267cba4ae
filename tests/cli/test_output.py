"""Tables written to a pipe (CliRunner's output is not a terminal): every name whole,
whatever its length, in plain columns."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import ember.cli.cluster as cluster_cli
from ember.cli import app
from ember.store.local import LocalStore

LONG = "a-deployment-with-a-name-much-longer-than-any-terminal-column-" + "x" * 60


def test_status_piped_shows_whole_names(monkeypatch: pytest.MonkeyPatch) -> None:
    status = {
        "deployments": [
            {"name": LONG, "model": LONG + "-model", "min_instances": 0, "max_instances": 4,
             "target_concurrency": 16, "keep_alive_s": 120.0, "waiting_requests": 5, "state": "ready",
             "reason": None,
             "instances": [{"id": "i1", "node": "node0", "state": "ready", "in_flight": 3}]},
            {"name": "bad", "model": "bad", "min_instances": 1, "max_instances": 4,
             "target_concurrency": 16, "keep_alive_s": 120.0, "state": "failed",
             "reason": "CorruptCheckpointError: index is not valid JSON", "instances": []},
        ],
        "nodes": [{"id": "node0", "slots": 2, "free_slots": 1, "dram": {LONG: 123_000_000}, "disk": [LONG]}],
    }  # fmt: skip
    monkeypatch.setattr(cluster_cli, "_call", lambda *args, **kwargs: status)
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "deployments"
    header = [
        "name",
        "model",
        "state",
        "ready",
        "instances",
        "target",
        "keep-alive",
        "in",
        "flight",
        "waiting",
    ]
    assert lines[1].split() == header
    assert lines[2].split() == [LONG, LONG + "-model", "ready", "1/1", "0-4", "16", "120s", "3", "5"]
    assert lines[3].split() == ["bad", "bad", "failed", "0/0", "1-4", "16", "120s", "0", "-"]
    assert "bad: CorruptCheckpointError: index is not valid JSON" in lines
    assert f"{LONG} (123.0 MB)" in result.stdout


def test_store_ls_piped_shows_whole_names(tiny_llama: tuple[Path, Any]) -> None:
    store = LocalStore()
    shutil.copytree(tiny_llama[0], store.path_for(LONG))
    store.register(LONG)
    result = CliRunner().invoke(app, ["store", "ls"])
    assert result.exit_code == 0, result.output
    row = result.stdout.splitlines()[2].split()
    assert row[0] == LONG and row[-1] == "store"
