"""`ember serve`: the OpenAI-compatible server, embedded (one process)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from ember import env
from ember.cli.output import stage_progress


def serve_cmd(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Store name or checkpoint directory; repeat to serve several."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on. [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on. [default: 8000]")] = None,
    api_key: Annotated[
        str | None, typer.Option(help="Require 'Authorization: Bearer KEY' (or set EMBER_API_KEY).")
    ] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="Scheduling policy: mlfq, fcfs or srpt. [default: mlfq]")
    ] = None,
    swap: Annotated[
        str | None, typer.Option(help="KV swapping: proactive, reactive or off. [default: proactive]")
    ] = None,
    kv_cache_bytes: Annotated[int | None, typer.Option(help="KV cache budget in bytes per model.")] = None,
    swap_bytes: Annotated[int | None, typer.Option(help="Host swap space for KV blocks, bytes.")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Most sequences a batch. [default: 32]")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Longest prompt + output, tokens.")] = None,
    max_body_bytes: Annotated[int | None, typer.Option(help="Request body limit. [default: 2 MiB]")] = None,
    max_in_flight: Annotated[
        int | None, typer.Option(help="Requests in flight before 503 + Retry-After. [default: 256]")
    ] = None,
    shutdown_grace_s: Annotated[
        float | None, typer.Option(help="On SIGTERM, seconds in-flight requests get to finish. [default: 30]")
    ] = None,
    home: Annotated[Path | None, typer.Option(help="EMBER_HOME: where the store lives.")] = None,
    registry: Annotated[str | None, typer.Option(help="Remote registry: a directory or http(s) URL.")] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning, error. [default: info]")
    ] = None,
    nodes: Annotated[int | None, typer.Option(help="Nodes of the control plane. [default: 1]")] = None,
    slots: Annotated[int | None, typer.Option(help="Instances per node. [default: 1]")] = None,
    placement: Annotated[
        str | None,
        typer.Option(
            help="startup-time-aware, random, round-robin or remote-only. [default: startup-time-aware]"
        ),
    ] = None,
    start_timeout_s: Annotated[
        float | None, typer.Option(help="Seconds a request waits for a cold start before 503. [default: 300]")
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Run the nodes on a Ray cluster: 'auto' (the one started here with `ray start "
            "--head`) or its address; one node per Ray node, --slots per CPU-only node."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="A TOML file of these settings; flags override it.")
    ] = None,
) -> None:
    """Serve models over an OpenAI-compatible API. With no arguments: SmolLM2-135M-Instruct
    as `smollm2-135m-instruct` on 127.0.0.1:8000, imported on first run. Each model is a
    deployment with one instance always up; `ember deploy` adds more (scaled to zero)."""
    from ember.server.runner import serve
    from ember.server.settings import load_settings

    settings = load_settings(
        config,
        {
            "models": model or [],
            "host": host,
            "port": port,
            "api_key": api_key,
            "scheduler": scheduler,
            "swap": swap,
            "kv_cache_bytes": kv_cache_bytes,
            "swap_bytes": swap_bytes,
            "max_num_seqs": max_num_seqs,
            "max_model_len": max_model_len,
            "max_body_bytes": max_body_bytes,
            "max_in_flight": max_in_flight,
            "shutdown_grace_s": shutdown_grace_s,
            "home": str(home) if home else None,
            "registry": registry,
            "log_level": log_level,
            "nodes": nodes,
            "slots": slots,
            "placement": placement,
            "start_timeout_s": start_timeout_s,
            "ray": ray,
        },
    )
    if settings.home:
        os.environ[env.EMBER_HOME] = settings.home
    if settings.registry:
        os.environ[env.EMBER_REGISTRY] = settings.registry
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    typer.echo(
        f"Ember serving {', '.join(settings.models)} on http://{settings.host}:{settings.port}", err=True
    )
    serve(settings, progress=lambda: stage_progress({}))
