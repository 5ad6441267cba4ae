"""The admin routes over a recording ClusterAdmin (no cluster, no port): every bad field
is a 400 in OpenAI's error shape before the control plane sees anything, names may
hold '/', and a failed database write is a 503 the client can retry."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from ember.cluster.state import Deployment
from ember.errors import ClusterStateError
from ember.server.admin import add_admin_routes
from ember.server.app import create_app

pytestmark = pytest.mark.timeout(30)


class RecordingAdmin:
    """A ClusterAdmin that keeps what it was asked; `fail` makes the next write raise."""

    def __init__(self) -> None:
        self.deployed: list[Deployment] = []
        self.deleted: list[str] = []
        self.fail: Exception | None = None

    async def deploy(self, dep: Deployment) -> Deployment:
        if self.fail is not None:
            raise self.fail
        self.deployed.append(dep)
        return dep

    async def delete(self, name: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.deleted.append(name)

    async def status(self) -> dict[str, Any]:
        return {"deployments": [], "nodes": []}


def call(admin: RecordingAdmin, method: str, path: str, content: str | None = None) -> httpx.Response:
    app = create_app()
    add_admin_routes(app)
    app.state.ember.backend = admin

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            headers = {"content-type": "application/json"}
            return await client.request(method, path, content=content, headers=headers)

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"model": "m", "keep_alive_s": NaN}', "keep_alive_s"),  # Python's json reads NaN
        ('{"model": "m", "keep_alive_s": Infinity}', "keep_alive_s"),
        ('{"model": "m", "keep_alive_s": -1}', "keep_alive_s"),
        ('{"model": "m", "max_instances": 1025}', "max_instances"),
        ('{"model": "m", "min_instances": 5, "max_instances": 4}', "min_instances"),
        ('{"model": "m", "target_concurrency": 0}', "target_concurrency"),
        ('{"model": "m", "min_instances": true}', "min_instances"),
        ('{"model": "m", "max_instances": "4"}', "max_instances"),
        ('{"model": "m", "max_instances": 99999999999999999999999}', "max_instances"),
        ('{"model": "m", "name": ""}', "name"),  # not the model's name: a bad name
        ('{"model": "m", "name": "a/../b"}', "name"),
        ('{"model": ""}', "model"),
        ('{"name": "d"}', "model"),
        ('{"model": "m", "replicas": 2}', "replicas"),
    ],
    ids=lambda v: v if isinstance(v, str) else repr(v),
)
def test_a_bad_field_is_a_400_naming_it_and_reaches_nothing(body: str, param: str) -> None:
    admin = RecordingAdmin()
    response = call(admin, "POST", "/admin/deployments", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert admin.deployed == []


def test_a_deployment_is_named_after_its_model_unless_named() -> None:
    admin = RecordingAdmin()
    made = call(admin, "POST", "/admin/deployments", json.dumps({"model": "m", "keep_alive_s": 5}))
    assert made.status_code == 201 and made.json()["name"] == "m"
    call(admin, "POST", "/admin/deployments", json.dumps({"model": "m", "name": "org/m"}))
    assert [(d.name, d.model) for d in admin.deployed] == [("m", "m"), ("org/m", "m")]
    assert admin.deployed[0].keep_alive_s == 5


def test_a_name_with_a_slash_is_deleted_by_its_path() -> None:
    admin = RecordingAdmin()
    response = call(admin, "DELETE", "/admin/deployments/org/m")
    assert response.status_code == 200 and response.json() == {"deleted": "org/m"}
    assert admin.deleted == ["org/m"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/admin/deployments", '{"model": "m"}'), ("DELETE", "/admin/deployments/m", None)],
)
def test_a_failed_database_write_is_a_503_to_retry(method: str, path: str, body: str | None) -> None:
    admin = RecordingAdmin()
    admin.fail = ClusterStateError("the cluster state database failed: disk I/O error; nothing was changed")
    response = call(admin, method, path, body)
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "overloaded_error" and "nothing was changed" in error["message"]


def test_an_unexpected_failure_is_a_500_saying_what_went_wrong() -> None:
    admin = RecordingAdmin()
    admin.fail = OSError(28, "No space left on device")
    response = call(admin, "POST", "/admin/deployments", '{"model": "m"}')
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_error" and "No space left on device" in error["message"]
