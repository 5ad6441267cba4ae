"""The control plane's admin API, under the same API key as the OpenAI routes:

POST   /admin/deployments         create or update a deployment (JSON body)
DELETE /admin/deployments/{name}  stop taking requests; instances go once drained
GET    /admin/status              deployments with live instances, nodes

Each write is all or nothing: a bad field is a 400 before anything changes, and a
failed database write (ClusterStateError, 503) leaves the deployments as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from dataclasses import asdict
from typing import Any, Protocol, TypeVar, runtime_checkable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, model_validator

from ember.cluster.state import (
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_INSTANCES,
    DEFAULT_MIN_INSTANCES,
    DEFAULT_TARGET_CONCURRENCY,
    Deployment,
)
from ember.errors import EmberError, NotFoundError
from ember.server.app import read_body, server_state

T = TypeVar("T")
log = logging.getLogger(__name__)


@runtime_checkable
class ClusterAdmin(Protocol):
    """What the admin routes call: the Controller, or RayBackend in front of its actor."""

    async def deploy(self, dep: Deployment) -> Deployment: ...

    async def delete(self, name: str) -> None: ...

    async def status(self) -> dict[str, Any]: ...


class DeploymentBody(BaseModel):
    """POST /admin/deployments. The types are checked here (strictly: `true` is not 1,
    "4" not 4), the values by `Deployment` itself, so a bad field gets the same message
    here, from `ember deploy` and from the Python API, and nothing reaches the control
    plane."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    name: str | None = None  # default: the model's name ("" is a bad name, not the default)
    min_instances: int = DEFAULT_MIN_INSTANCES
    max_instances: int = DEFAULT_MAX_INSTANCES
    target_concurrency: int = DEFAULT_TARGET_CONCURRENCY
    keep_alive_s: float = DEFAULT_KEEP_ALIVE_S

    @model_validator(mode="after")
    def _valid(self) -> DeploymentBody:
        self.deployment()  # InvalidRequestError (400) passes through pydantic unchanged
        return self

    def deployment(self) -> Deployment:
        fields = self.model_dump()
        fields["name"] = self.model if self.name is None else self.name
        return Deployment(**fields)


def add_admin_routes(app: FastAPI) -> None:
    """Mount the admin routes on an app made by create_app (its backend a ClusterAdmin).
    Like create_app's, the routes reach the state through the request (no closure)."""

    @app.post("/admin/deployments")
    async def create_deployment(request: Request) -> JSONResponse:
        body = await read_body(request, server_state(request), DeploymentBody)
        dep = await _clear_errors(_controller(request).deploy(body.deployment()))
        return JSONResponse(asdict(dep), status_code=201)

    @app.delete("/admin/deployments/{name:path}")  # a name may hold '/' (org/model)
    async def delete_deployment(name: str, request: Request) -> dict[str, Any]:
        await _clear_errors(_controller(request).delete(name))
        return {"deleted": name}

    @app.get("/admin/status")
    async def status(request: Request) -> dict[str, Any]:
        return await _controller(request).status()


def _controller(request: Request) -> ClusterAdmin:
    backend = server_state(request).require_backend()
    if not isinstance(backend, ClusterAdmin):
        raise NotFoundError("this server runs no control plane")
    return backend


async def _clear_errors(write: Awaitable[T]) -> T:
    """An admin write's result; an error that is not an EmberError (a bug, the disk) is
    a 500 in OpenAI's error shape with what went wrong, not a bare 'Internal Server
    Error' (the traceback goes to the log)."""
    try:
        return await write
    except EmberError:
        raise
    except Exception as exc:
        log.exception("an admin write failed")
        raise EmberError(f"the admin call failed: {type(exc).__name__}: {exc}") from exc
