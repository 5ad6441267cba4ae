"""`ember serve`: the OpenAI-compatible server, embedded (one process) or on Ray.

Each flag is a setting of server/settings.py's ServeSettings under the same name:
its help is the setting's description and default. A flag not given is None and
leaves the config file and EMBER_<NAME> be. Every value is checked with the others:
a bad one exits 1 before the port opens.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ember import env
from ember.cli.output import err_console, stage_progress
from ember.server.settings import SETTINGS, default_of, help_of


def flag(name: str, *decls: str) -> Any:
    """The option of setting `name`: its help, then its default if it has one."""
    value = default_of(name)
    if isinstance(value, list):
        value = ", ".join(value)
    shown = "" if value is None else f" [default: {value}]"
    return typer.Option(*decls, help=f"{help_of(name)}{shown}")


def serve_cmd(
    # One parameter per setting, named as the setting: passed on by name.
    models: Annotated[list[str] | None, flag("models", "--model", "-m")] = None,
    host: Annotated[str | None, flag("host")] = None,
    port: Annotated[int | None, flag("port")] = None,
    api_key: Annotated[str | None, flag("api_key")] = None,
    api_key_file: Annotated[str | None, flag("api_key_file")] = None,
    admin_key: Annotated[str | None, flag("admin_key")] = None,
    admin_key_file: Annotated[str | None, flag("admin_key_file")] = None,
    scheduler: Annotated[str | None, flag("scheduler")] = None,
    swap: Annotated[str | None, flag("swap")] = None,
    kv_cache_bytes: Annotated[int | None, flag("kv_cache_bytes")] = None,
    swap_bytes: Annotated[int | None, flag("swap_bytes")] = None,
    max_num_seqs: Annotated[int | None, flag("max_num_seqs")] = None,
    max_num_batched_tokens: Annotated[int | None, flag("max_num_batched_tokens")] = None,
    num_threads: Annotated[int | None, flag("num_threads")] = None,
    max_model_len: Annotated[int | None, flag("max_model_len")] = None,
    max_body_bytes: Annotated[int | None, flag("max_body_bytes")] = None,
    max_in_flight: Annotated[int | None, flag("max_in_flight")] = None,
    shutdown_grace_s: Annotated[float | None, flag("shutdown_grace_s")] = None,
    home: Annotated[str | None, flag("home")] = None,
    registry: Annotated[str | None, flag("registry")] = None,
    log_level: Annotated[str | None, flag("log_level")] = None,
    nodes: Annotated[int | None, flag("nodes")] = None,
    slots: Annotated[int | None, flag("slots")] = None,
    placement: Annotated[str | None, flag("placement")] = None,
    no_migration: Annotated[bool | None, flag("no_migration", "--no-migration")] = None,
    dram_bytes: Annotated[int | None, flag("dram_bytes")] = None,
    disk_bytes: Annotated[int | None, flag("disk_bytes")] = None,
    start_timeout_s: Annotated[float | None, flag("start_timeout_s")] = None,
    ray: Annotated[str | None, flag("ray")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="A TOML file of these settings, keys as the flags with _ for - (models for "
            "--model); EMBER_<KEY> variables override it, and flags override both."
        ),
    ] = None,
) -> None:
    """Serve models over an OpenAI-compatible API. With no arguments: SmolLM2-135M-Instruct
    as `smollm2-135m-instruct` on 127.0.0.1:8000, imported on first run. Each model is a
    deployment with one instance always up; `ember deploy` adds more (scaled to zero)."""
    from ember.server.listen import listen
    from ember.server.settings import load_settings

    flags = {name: value for name, value in locals().items() if name in SETTINGS}
    settings = load_settings(config, flags)
    sock = listen(settings.host, settings.port)  # first: a port in use fails here, at once
    try:
        if settings.home:
            os.environ[env.EMBER_HOME] = settings.home
        if settings.registry:
            os.environ[env.EMBER_REGISTRY] = settings.registry
        logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        typer.echo(
            f"Ember serving {', '.join(settings.models)} on http://{settings.host}:{settings.port}", err=True
        )
        from ember.server.runner import logged_progress, serve

        # A bar on a terminal; under a log collector, a log line per stage of the import.
        terminal = err_console().is_terminal
        serve(settings, sock, progress=(lambda: stage_progress({})) if terminal else logged_progress)
    finally:
        sock.close()
