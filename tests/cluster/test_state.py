"""ClusterState and Deployment: a deployment is checked on creation (every field, in
range, finite), and a write SQLite fails changes nothing in the file."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from ember.cluster.state import ClusterState, Deployment, InstanceRecord
from ember.errors import ClusterStateError, InvalidRequestError
from tests.cluster.fakes import FailingCommits

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"keep_alive_s": math.nan}, "keep_alive_s"),
        ({"keep_alive_s": math.inf}, "keep_alive_s"),
        ({"keep_alive_s": -1.0}, "keep_alive_s"),
        ({"keep_alive_s": 1e300}, "keep_alive_s"),
        ({"keep_alive_s": True}, "keep_alive_s"),
        ({"max_instances": 1025}, "max_instances"),
        ({"max_instances": 0}, "max_instances"),
        ({"max_instances": 2**70}, "max_instances"),
        ({"min_instances": -1}, "min_instances"),
        ({"min_instances": 3, "max_instances": 2}, "min_instances"),
        ({"min_instances": True}, "min_instances"),
        ({"min_instances": 1.0}, "min_instances"),
        ({"target_concurrency": 0}, "target_concurrency"),
        ({"target_concurrency": "4"}, "target_concurrency"),
        ({"name": ""}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"name": "-lead"}, "name"),
        ({"name": "a b"}, "name"),
        ({"name": "org//model"}, "name"),
        ({"name": "org/../model"}, "name"),
        ({"name": "org/model/"}, "name"),
        ({"model": ""}, "model"),
        ({"model": "no/slash"}, "model"),
    ],
    ids=repr,
)
def test_a_deployment_outside_its_bounds_is_refused_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as exc:
        Deployment(**{"name": "d", "model": "m", **fields})
    assert exc.value.param == param and exc.value.status == 400
    assert param.split("_")[0] in exc.value.message


def test_the_bounds_themselves_and_org_names_are_accepted() -> None:
    Deployment("org/model.v2_b-1", "m", min_instances=1024, max_instances=1024, keep_alive_s=0)
    Deployment("x" * 128, "m", target_concurrency=1_000_000, keep_alive_s=365 * 86400)


def test_a_write_whose_commit_fails_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cluster.db"
    state = ClusterState(path)
    kept = state.put_deployment(Deployment("kept", "m"))
    fail = FailingCommits(monkeypatch, path, "database is locked")
    writes = [
        lambda: state.put_deployment(Deployment("new", "m")),
        lambda: state.put_deployment(Deployment("kept", "m", keep_alive_s=1)),
        lambda: state.delete_deployment("kept"),
        lambda: state.add_instance(InstanceRecord("i1", "kept", "node0", "loading", 1.0)),
    ]
    for write in writes:
        fail.arm()
        with pytest.raises(ClusterStateError) as exc:
            write()
        assert exc.value.status == 503 and "database is locked" in exc.value.message
        assert "nothing was changed" in exc.value.message
        again = ClusterState(path)
        assert again.deployments() == [kept] and again.instances(live_only=False) == []
    assert fail.failed == len(writes)
    state.put_deployment(Deployment("new", "m"))  # the next write goes through
    assert [d.name for d in ClusterState(path).deployments()] == ["kept", "new"]


def test_a_stored_row_outside_todays_bounds_is_left_out_until_deployed_again(tmp_path: Path) -> None:
    path = tmp_path / "cluster.db"
    ClusterState(path).put_deployment(Deployment("old", "m"))
    with sqlite3.connect(path) as db:  # as an Ember without the bound wrote it
        db.execute("UPDATE deployments SET max_instances = 5000 WHERE name = 'old'")
    db.close()
    state = ClusterState(path)
    assert state.deployments() == []  # the server still starts
    state.put_deployment(Deployment("old", "m", max_instances=8))
    assert [d.max_instances for d in ClusterState(path).deployments()] == [8]
