"""`ember deploy`, `ember delete`, `ember status`: the control plane's admin API from
the command line, against --url / EMBER_URL, sending the admin key (--admin-key or
EMBER_ADMIN_KEY) or else EMBER_API_KEY when set."""

from __future__ import annotations

import os
from typing import Annotated, Any

import httpx
import typer

from ember import env
from ember.cli.output import JsonOption, human_bytes, print_json, print_table
from ember.cluster.state import (
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_INSTANCES,
    DEFAULT_MIN_INSTANCES,
    DEFAULT_TARGET_CONCURRENCY,
    Deployment,
)
from ember.errors import EmberError

UrlOption = Annotated[
    str | None, typer.Option(help=f"The server (or {env.EMBER_URL}). [default: {env.DEFAULT_URL}]")
]


AdminKeyOption = Annotated[
    str | None,
    typer.Option(
        help=f"The server's admin key (or {env.EMBER_ADMIN_KEY}); unset, {env.EMBER_API_KEY} is sent.",
        show_default=False,
    ),
]


def _call(
    method: str, path: str, url: str | None, body: dict[str, Any] | None = None, admin_key: str | None = None
) -> Any:
    base = env.server_url(url)
    headers = {}
    if key := admin_key or os.environ.get(env.EMBER_ADMIN_KEY) or os.environ.get(env.EMBER_API_KEY):
        headers["Authorization"] = f"Bearer {key}"
    try:
        response = httpx.request(
            method, f"{base}{path}", json=body, headers=headers, timeout=600, verify=env.verify_tls(base)
        )
    except httpx.ConnectError as exc:
        raise EmberError(f"no Ember server at {base} (start one with `ember serve`)") from exc
    except httpx.TransportError as exc:
        raise EmberError(f"{base}: {exc}") from exc
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        raise EmberError(f"{base}: {message or response.text or response.status_code}")
    return data


def deploy_cmd(
    model: Annotated[str, typer.Argument(help="A checkpoint in the store or the registry.")],
    name: Annotated[str | None, typer.Option(help="Name clients send as `model`. [default: MODEL]")] = None,
    min_instances: Annotated[
        int, typer.Option(help="Instances always up (0: scale to zero).")
    ] = DEFAULT_MIN_INSTANCES,
    max_instances: Annotated[int, typer.Option(help="Most instances.")] = DEFAULT_MAX_INSTANCES,
    target_concurrency: Annotated[
        int, typer.Option(help="Requests in flight per instance before another starts.")
    ] = DEFAULT_TARGET_CONCURRENCY,
    keep_alive: Annotated[
        float, typer.Option(help="Seconds an idle instance stays before it goes.")
    ] = DEFAULT_KEEP_ALIVE_S,
    url: UrlOption = None,
    admin_key: AdminKeyOption = None,
) -> None:
    """Create (or update) a deployment: MODEL served as NAME, scaled by requests in flight."""
    # Checked here as the server checks it (the same messages), before any request:
    # NaN or inf would not even survive the JSON encoding.
    Deployment(
        model if name is None else name, model, min_instances, max_instances, target_concurrency, keep_alive
    )
    body = {
        "model": model, "name": name, "min_instances": min_instances, "max_instances": max_instances,
        "target_concurrency": target_concurrency, "keep_alive_s": keep_alive,
    }  # fmt: skip
    dep = _call("POST", "/admin/deployments", url, body, admin_key)
    typer.echo(f"deployed {dep['model']} as {dep['name']}")


def delete_cmd(
    name: Annotated[str, typer.Argument(help="The deployment.")],
    url: UrlOption = None,
    admin_key: AdminKeyOption = None,
) -> None:
    """Delete a deployment: it takes no new requests; its instances go once drained."""
    _call("DELETE", f"/admin/deployments/{name}", url, admin_key=admin_key)
    typer.echo(f"deleted {name}")


def status_cmd(url: UrlOption = None, admin_key: AdminKeyOption = None, as_json: bool = JsonOption) -> None:
    """Deployments with their live instances, and nodes with what they hold."""
    data = _call("GET", "/admin/status", url, admin_key=admin_key)
    if as_json:
        print_json(data)
        return
    rows = []
    for d in data["deployments"]:
        ready = sum(i["state"] == "ready" for i in d["instances"])
        in_flight = sum(i["in_flight"] for i in d["instances"])
        rows.append([
            d["name"], d["model"], d.get("state", "-"), f"{ready}/{len(d['instances'])}",
            f"{d['min_instances']}-{d['max_instances']}", d["target_concurrency"], f"{d['keep_alive_s']:g}s",
            in_flight, d.get("waiting_requests", "-"),  # "-": a server from before the field
        ])  # fmt: skip
    columns = ["name", "model", "state", "ready", "instances", "target", "keep-alive", "in flight", "waiting"]
    print_table("deployments", columns, rows)
    for d in data["deployments"]:  # why a deployment failed, or why its last start did
        if d.get("reason"):
            typer.echo(f"{d['name']}: {d['reason']}")
    nodes = [
        [
            n["id"], f"{n['free_slots']}/{n['slots']}",
            ", ".join(f"{k} ({human_bytes(v)})" for k, v in n["dram"].items()) or "-",
            ", ".join(n["disk"]) or "-",
        ]
        for n in data["nodes"]
    ]  # fmt: skip
    print_table("nodes", ["node", "free slots", "dram", "disk"], nodes)
