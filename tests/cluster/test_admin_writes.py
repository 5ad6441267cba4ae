"""Every write the control plane makes is all or nothing across a failed SQLite commit:
deploy (create, update) and delete through the admin API, an instance added for a
request and one removed after keep-alive by the autoscaler. After each failure the
server's memory (status()) and the database agree and are what they were before,
the client gets a 503 in OpenAI's shape, and the same write then goes through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.cluster.controller import Controller
from ember.cluster.state import ClusterState, Deployment
from ember.server.admin import add_admin_routes
from ember.server.app import create_app
from tests.cluster.conftest import collect, make_controller, request, run
from tests.cluster.fakes import FailingCommits, FakeClock

pytestmark = pytest.mark.timeout(120)
POLICY = ("model", "min_instances", "max_instances", "target_concurrency", "keep_alive_s")


async def views(c: Controller, state: ClusterState) -> tuple[Any, Any]:
    """(memory, database): each deployment with its policy and its live instances as
    (id, node, state), from status() and from SQLite."""
    memory = {
        d["name"]: (tuple(d[k] for k in POLICY), {(i["id"], i["node"], i["state"]) for i in d["instances"]})
        for d in (await c.status())["deployments"]
    }
    live = state.instances()
    stored = {
        d.name: (
            (d.model, d.min_instances, d.max_instances, d.target_concurrency, d.keep_alive_s),
            {(i.id, i.node, i.state) for i in live if i.deployment == d.name},
        )
        for d in state.deployments()
    }
    return memory, stored


def test_every_write_is_all_or_nothing_across_a_failed_commit(
    ember_home: Path, models: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    db = ember_home / "cluster.db"
    fail = FailingCommits(monkeypatch, db)

    async def main() -> None:
        c = make_controller(ember_home, clock=clock)
        await c.start([Deployment("tiny", "tiny", keep_alive_s=30)])
        app = create_app()
        add_admin_routes(app)
        app.state.ember.backend = c
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ember")
        state = c.state  # each call reads the file afresh

        async def fails(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
            """The call with its commit failing: a 503 to retry, nothing changed."""
            before = await views(c, state)
            assert before[0] == before[1]
            fail.arm()
            response = await client.request(method, path, json=body)
            assert fail.failed == 1 and fail.armed == 0
            fail.failed = 0
            assert response.status_code == 503 and "retry-after" in response.headers, response.text
            assert await views(c, state) == before
            error: dict[str, Any] = response.json()["error"]
            assert error["type"] == "overloaded_error" and "disk I/O error" in error["message"]
            return error

        async def agree() -> dict[str, Any]:
            memory, stored = await views(c, state)
            assert memory == stored
            return memory

        try:
            new = {"model": "tiny2", "name": "new", "min_instances": 0}
            await fails("POST", "/admin/deployments", new)
            assert (await client.post("/admin/deployments", json=new)).status_code == 201
            assert set(await agree()) == {"tiny", "new"}

            await fails("POST", "/admin/deployments", {**new, "keep_alive_s": 5})
            assert (
                await client.post("/admin/deployments", json={**new, "keep_alive_s": 5})
            ).status_code == 201
            assert (await agree())["new"][0][-1] == 5

            await fails("DELETE", "/admin/deployments/new")
            assert (await client.delete("/admin/deployments/new")).status_code == 200
            assert set(await agree()) == {"tiny"}

            # An instance added for a request: its record fails, so there is no instance,
            # and the request (waiting for it) gets the error; the next one is served.
            before = await views(c, state)
            fail.arm()
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 503 and fail.failed == 1, response.text
            assert "nothing was changed" in json.loads(response.text)["error"]["message"]
            await c.settle()
            assert await views(c, state) == before
            clock.advance(1)  # the failed start's backoff (1 s): the next request starts one
            assert len(await collect(c, "tiny", request("served"))) == 8
            [(_, instances)] = (await agree()).values()
            assert [s for _, _, s in instances] == ["ready"]

            # The instance removed after keep-alive: its record fails, so it stays and serves.
            before = await views(c, state)
            clock.advance(31)
            fail.arm()
            c.reconcile()
            await c.settle()
            assert fail.failed == 2 and await views(c, state) == before
            c.reconcile()  # the autoscaler's next tick
            await c.settle()
            assert await agree() == {"tiny": (before[0]["tiny"][0], set())}
        finally:
            await client.aclose()
            await c.close()
        again = ClusterState(db)  # a fresh look at the file once the controller is gone
        assert [d.name for d in again.deployments()] == ["tiny"] and again.instances() == []

    run(main)
