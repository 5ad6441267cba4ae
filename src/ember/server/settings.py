"""`ember serve`'s settings, typed and checked before anything starts.

Each setting is one field of ServeSettings: its type (a Literal for a choice), its
default and its description, which is the help of its flag (cli/serve.py) and the
line docs/serving.md gives it. Values come in layers, each over the one before:

    defaults -> ember.toml (--config, keys as the field names) -> EMBER_<NAME>
    variables (env.setting_variable) -> flags

A value that is not of its type, an unknown choice or an unknown TOML key is an
InvalidRequestError naming the setting and where the value came from.

Adding a setting: a field here with its default and description, then its flag in
cli/serve.py (`flag("name")`), and its line in docs/serving.md.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ember.engine.options import (
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_SCHEDULER,
    DEFAULT_SWAP,
    SchedulerName,
    SwapMode,
)
from ember.env import setting_variable
from ember.errors import InvalidRequestError

DEFAULT_MODEL = "smollm2-135m-instruct"
# cluster/placement.py's POLICIES, by name (tests/server/test_settings.py checks they agree)
PlacementName = Literal["startup-time-aware", "random", "round-robin", "remote-only"]
LogLevel = Literal["debug", "info", "warning", "error"]


class ServeSettings(BaseModel):
    """Everything `ember serve` can be told; docs/serving.md explains each."""

    # defer_build: the validator is built on first use, not when `ember --help` imports this
    model_config = ConfigDict(extra="forbid", defer_build=True)

    models: list[str] = Field(
        default_factory=lambda: [DEFAULT_MODEL],
        min_length=1,
        description="Store names or checkpoint directories to serve; clients send the name "
        "(a directory's last part) as `model`.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    api_key: str | None = Field(
        None, description="Require 'Authorization: Bearer KEY' on every route but /health and /metrics."
    )
    scheduler: SchedulerName = Field(
        DEFAULT_SCHEDULER,
        description="Scheduling policy of every engine: mlfq (skip-join MLFQ), fcfs, or srpt "
        "(an oracle, for evaluation).",
    )
    swap: SwapMode = Field(
        DEFAULT_SWAP,
        description="KV swapping of preempted jobs: proactive, reactive, or off (recompute, as vLLM).",
    )
    kv_cache_bytes: int | None = Field(
        None,
        gt=0,
        description="KV cache budget per model, bytes (unset: 512 MiB on CPU, half the free "
        "accelerator memory on CUDA).",
    )
    swap_bytes: int | None = Field(
        None, ge=0, description="Host swap space for preempted jobs' KV blocks, bytes (unset: the KV budget)."
    )
    max_num_seqs: int = Field(DEFAULT_MAX_NUM_SEQS, ge=1, description="Most sequences in one batch.")
    max_num_batched_tokens: int = Field(
        DEFAULT_MAX_NUM_BATCHED_TOKENS,
        ge=1,
        description="Most tokens computed in one iteration (prefill chunks and decodes).",
    )
    max_model_len: int | None = Field(
        None,
        ge=2,
        description="Longest prompt + output, tokens (unset: the model's context, at most 8192 "
        "and what the KV budget holds).",
    )
    max_body_bytes: int = Field(2 << 20, ge=1, description="Larger request bodies get 413.")
    max_in_flight: int = Field(256, ge=1, description="Requests in flight before 503 with Retry-After.")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, seconds the requests in flight get to finish."
    )
    home: str | None = Field(
        None, description="Where the store, catalogue and node caches live (unset: ~/.ember)."
    )
    registry: str | None = Field(
        None, description="Remote registry the nodes fetch from: a directory or an http(s) URL."
    )
    log_level: LogLevel = Field("info", description="Log level: debug, info, warning or error.")
    nodes: int = Field(1, ge=1, description="Embedded nodes of the control plane.")
    slots: int = Field(1, ge=1, description="Instances each node runs at once.")
    placement: PlacementName = Field(
        "startup-time-aware",
        description="Where new instances start: startup-time-aware, random, round-robin, or "
        "remote-only (every start downloads).",
    )
    start_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a request waits for a cold start before 503."
    )
    ray: str | None = Field(
        None,
        description="Run the nodes on a Ray cluster: 'auto' (the one started here with `ray start "
        "--head`) or its address; one node per Ray node, --slots per CPU-only node.",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        # EMBER_MODELS=a,b (and `models = "a"` in TOML) name several models, or one
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    def engine_options(self) -> dict[str, Any]:
        """The EngineConfig fields these settings give every engine."""
        opts: dict[str, Any] = {
            "scheduler": self.scheduler,
            "swap": self.swap,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
        }
        for name in ("max_model_len", "kv_cache_bytes", "swap_bytes"):
            if getattr(self, name) is not None:
                opts[name] = getattr(self, name)
        return opts


def load_settings(
    config: Path | None, flags: Mapping[str, Any], environ: Mapping[str, str] = os.environ
) -> ServeSettings:
    """Defaults, then the TOML file's values, then EMBER_<NAME> variables, then flags
    (those not None or empty). Raises InvalidRequestError on any bad value."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}  # setting -> where its value came from
    if config is not None:
        for name, value in _read_toml(config).items():
            values[name], origin[name] = value, str(config)
    for name in ServeSettings.model_fields:
        variable = setting_variable(name)
        if environ.get(variable):
            values[name], origin[name] = environ[variable], variable
    for name, value in flags.items():
        if value is not None and value != []:
            values[name], origin[name] = (
                value,
                "--" + ("model" if name == "models" else name).replace("_", "-"),
            )
    try:
        return ServeSettings.model_validate(values)
    except ValidationError as exc:
        raise _explain(exc, values, origin) from None


def _read_toml(config: Path) -> dict[str, Any]:
    try:
        values = tomllib.loads(config.read_text())
    except FileNotFoundError as exc:
        raise InvalidRequestError(f"no config file at {config}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequestError(f"{config}: {exc}") from exc
    unknown = sorted(set(values) - set(ServeSettings.model_fields))
    if unknown:
        raise InvalidRequestError(
            f"{config}: unknown settings {unknown}; known: {', '.join(ServeSettings.model_fields)}"
        )
    return values


def _explain(
    exc: ValidationError, values: Mapping[str, Any], origin: Mapping[str, str]
) -> InvalidRequestError:
    """The first error as `bad setting scheduler='mflq' (from --scheduler): ...`."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else "settings"
    where = f" (from {origin[name]})" if name in origin else ""
    shown = f"{name}={values[name]!r}" if name in values else name
    return InvalidRequestError(f"bad setting {shown}{where}: {error['msg']}", param=name)
