"""The control plane's admin API, under the same API key as the OpenAI routes:

POST   /admin/deployments         create or update a deployment (JSON body)
DELETE /admin/deployments/{name}  stop taking requests; instances go once drained
GET    /admin/status              deployments with live instances, nodes
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Protocol, runtime_checkable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ember.cluster.state import (
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_INSTANCES,
    DEFAULT_MIN_INSTANCES,
    DEFAULT_TARGET_CONCURRENCY,
    Deployment,
)
from ember.errors import NotFoundError
from ember.server.app import ServerState, read_body


@runtime_checkable
class ClusterAdmin(Protocol):
    """What the admin routes call: the Controller, or RayBackend in front of its actor."""

    async def deploy(self, dep: Deployment) -> Deployment: ...

    async def delete(self, name: str) -> None: ...

    async def status(self) -> dict[str, Any]: ...


class DeploymentBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    name: str | None = None  # default: the model's name
    min_instances: int = DEFAULT_MIN_INSTANCES
    max_instances: int = DEFAULT_MAX_INSTANCES
    target_concurrency: int = DEFAULT_TARGET_CONCURRENCY
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S


def add_admin_routes(app: FastAPI) -> None:
    """Mount the admin routes on an app made by create_app (its backend a ClusterAdmin)."""
    state: ServerState = app.state.ember

    def controller() -> ClusterAdmin:
        backend = state.require_backend()
        if not isinstance(backend, ClusterAdmin):
            raise NotFoundError("this server runs no control plane")
        return backend

    @app.post("/admin/deployments")
    async def create_deployment(request: Request) -> JSONResponse:
        body = await read_body(request, state, DeploymentBody)
        fields = body.model_dump()
        fields["name"] = fields["name"] or body.model
        dep = await controller().deploy(Deployment(**fields))
        return JSONResponse(asdict(dep), status_code=201)

    @app.delete("/admin/deployments/{name}")
    async def delete_deployment(name: str) -> dict[str, Any]:
        await controller().delete(name)
        return {"deleted": name}

    @app.get("/admin/status")
    async def status() -> dict[str, Any]:
        return await controller().status()
