"""While `ember serve` imports the default model on its first run, /health and every
other route answer 503 saying how far the import is. The import is a fake held at a
gate, so the test takes no real import's time."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

import ember.store.importer as importer
from ember.errors import MissingDependencyError
from ember.server.runner import build_app
from ember.server.settings import ServeSettings
from ember.store.import_progress import DEQUANTISE, PARSE


class GatedImport:
    """Stands in for ensure_default_model: reports progress, then waits at gates."""

    def __init__(self) -> None:
        self.started, self.halfway = threading.Event(), threading.Event()
        self.go_on, self.finish = threading.Event(), threading.Event()

    def __call__(self, store: Any = None, *, progress: Any) -> str:
        progress(PARSE, 0, 0)  # the sizes are not known yet
        self.started.set()
        assert self.go_on.wait(30)
        progress(DEQUANTISE, 42, 100)
        self.halfway.set()
        assert self.finish.wait(30)
        raise MissingDependencyError("the fake import ends here")


@pytest.mark.timeout(60)
def test_503s_during_the_first_run_import_say_how_far_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = GatedImport()
    monkeypatch.setattr(importer, "ensure_default_model", fake)
    stopped = threading.Event()
    app = build_app(ServeSettings(), on_failed=stopped.set)
    with TestClient(app) as client:
        try:
            assert fake.started.wait(30)
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json() == {
                "status": "starting",
                "message": "importing the model",
                "models": {"smollm2-135m-instruct": {"state": "importing"}},
            }

            fake.go_on.set()
            assert fake.halfway.wait(30)
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json() == {
                "status": "starting",
                "message": "importing the model, 42% done",
                "models": {"smollm2-135m-instruct": {"state": "importing", "progress": 42}},
            }
            chat = client.post(
                "/v1/chat/completions",
                json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}]},
            )
            models = client.get("/v1/models")
            for r in (chat, models):
                assert r.status_code == 503 and "retry-after" in r.headers
                assert r.json()["error"]["message"] == "the server is starting: importing the model, 42% done"

            fake.finish.set()  # the import fails: the server says so, and stops
            assert stopped.wait(30)
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json()["message"] == "the server failed to start: the fake import ends here"
            state = health.json()["models"]["smollm2-135m-instruct"]
            assert state["state"] == "failed" and "the fake import ends here" in state["reason"]
            assert app.state.ember.exit_reason == "the server failed to start: the fake import ends here"
        finally:
            fake.go_on.set()
            fake.finish.set()
