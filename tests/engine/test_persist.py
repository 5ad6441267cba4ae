import json
import logging
from pathlib import Path

import pytest

from ember.engine.persist import save_json_atomic


def test_writes_json_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "deeper" / "state.json"
    save_json_atomic(path, {"a": [1, 2]}, "state")
    save_json_atomic(path, {"a": [3]}, "state")
    assert json.loads(path.read_text()) == {"a": [3]}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_a_failed_write_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        save_json_atomic(blocker / "state.json", {"a": 1}, "learnt state")  # its parent is a file
    assert "could not save the learnt state" in caplog.text
    assert blocker.read_text() == ""
