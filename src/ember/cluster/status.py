"""The shape of `ember status --json` and GET /admin/status."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ember.backend import ModelState
from ember.cluster.messages import NodeStatus
from ember.cluster.router import Route
from ember.cluster.state import Deployment


def _model_state(model: ModelState) -> dict[str, Any]:
    return {"state": model.state, "reason": model.reason}


def _state(route: Route) -> str:
    if route.draining:
        return "draining"
    return "ready" if route.ready else "loading"


def cluster_status(
    deployments: Sequence[Deployment],
    routes: Sequence[Route],
    nodes: Sequence[NodeStatus],
    waiting: Mapping[str, int],
    states: Mapping[str, ModelState] | None = None,
) -> dict[str, Any]:
    """{"deployments": [...with live instances], "nodes": [...]} (docs/serving.md).
    `waiting`: per deployment, its requests waiting for an instance to take them (for
    a slot, or for a start); they are not instances. Each deployment's "state" (ready,
    starting, failed) comes from `states`, with its "reason" (why it failed, or why its
    last start did; null when none)."""
    states = states or {}
    return {
        "deployments": [
            {
                "name": d.name,
                "model": d.model,
                "min_instances": d.min_instances,
                "max_instances": d.max_instances,
                "target_concurrency": d.target_concurrency,
                "keep_alive_s": d.keep_alive_s,
                "waiting_requests": waiting.get(d.name, 0),
                **_model_state(states.get(d.name, ModelState("starting"))),
                "instances": [
                    {"id": r.instance_id, "node": r.node, "state": _state(r), "in_flight": r.in_flight}
                    for r in routes
                    if r.deployment == d.name
                ],
            }
            for d in deployments
        ],
        "nodes": [
            {
                "id": n.node_id,
                "slots": n.slots,
                "free_slots": n.free_slots,
                "dram": dict(n.dram),
                "disk": list(n.disk),
            }
            for n in nodes
        ],
    }
