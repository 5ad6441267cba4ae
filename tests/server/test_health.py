"""/health: 200 only when every served model can serve, else 503 with each model's
state; a model that fails for good stops the server (the runner's on_failed)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ember.backend import ModelState
from ember.server.health import health_answer, model_states
from ember.server.runner import build_app
from ember.server.settings import ServeSettings
from tests.cluster.conftest import ENGINE, models  # noqa: F401  (a fixture)

READY, STARTING = ModelState("ready"), ModelState("starting")


def test_200_only_when_every_model_is_ready_and_the_server_serves_from_its_backend() -> None:
    states = {"a": READY, "b": READY}
    assert health_answer(states, attached=True, draining=False, stage="") == (
        200,
        {"status": "ok", "models": {"a": {"state": "ready"}, "b": {"state": "ready"}}},
    )
    assert health_answer(states, attached=False, draining=False, stage="loading the models")[0] == 503
    assert health_answer(states, attached=True, draining=True, stage="")[1]["status"] == "stopping"


def test_a_model_not_ready_says_which_and_why() -> None:
    why = "the last start failed: NodeFailedError: node1 died"
    retrying = ModelState("starting", reason=why, retry_in_s=4.0)
    status, body = health_answer({"a": READY, "b": retrying}, attached=True, draining=False, stage="")
    assert status == 503 and body["status"] == "starting"
    assert body["message"] == "model 'b' is starting (the last start failed: NodeFailedError: node1 died)"
    assert body["models"]["b"] == {
        "state": "starting",
        "reason": "the last start failed: NodeFailedError: node1 died",
        "retry_in_s": 4.0,
    }
    failed = ModelState("failed", reason="CorruptCheckpointError: index is not valid JSON")
    status, body = health_answer({"a": READY, "b": failed}, attached=True, draining=False, stage="")
    assert (status, body["status"]) == (503, "failed")
    assert body["message"] == "model 'b' failed: CorruptCheckpointError: index is not valid JSON"


def test_each_model_is_importing_starting_or_failed_before_the_control_plane_knows_it() -> None:
    importing = {"m": ModelState("importing", progress=42)}
    assert model_states(["m", "n"], {}, importing, None) == {"m": importing["m"], "n": STARTING}
    assert model_states(["m"], {"m": READY}, {}, None) == {"m": READY}
    failed = model_states(["m", "n"], {"m": READY}, {}, OSError("disk full"))
    assert failed["m"] == READY
    assert failed["n"] == ModelState("failed", reason="the server failed to start: disk full")


@pytest.mark.timeout(120)
def test_a_corrupt_index_fails_its_model_in_health_and_stops_the_server(
    ember_home: Path,
    models: list[str],  # noqa: F811
) -> None:
    index = ember_home / "store" / "tiny" / "index.json"
    index.unlink()  # a new file: tiny2 shares tiny's as hard links
    index.write_text("{not json")
    settings = ServeSettings(
        models=["tiny", "tiny2"], start_timeout_s=60, log_level="warning",
        kv_cache_bytes=ENGINE["kv_cache_bytes"], max_model_len=ENGINE["max_model_len"], swap="off",
    )  # fmt: skip
    stopped = threading.Event()
    with TestClient(build_app(settings, on_failed=stopped.set)) as client:
        assert stopped.wait(60)
        health = client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "failed" and body["message"].startswith("model 'tiny' failed: ")
        assert body["models"]["tiny2"]["state"] in ("starting", "ready")  # the server stops either way
        assert body["models"]["tiny"]["state"] == "failed"
        reason = body["models"]["tiny"]["reason"]
        assert "index.json: not valid JSON" in reason
        assert str(ember_home) not in reason  # /health needs no key: no server paths in it
