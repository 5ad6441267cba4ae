"""`ember serve`'s settings: defaults, an optional ember.toml, then flags on top.

Every option is one field here; docs/serving.md lists them with their defaults.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ember import env
from ember.errors import InvalidRequestError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class ServeSettings:
    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])  # store names or checkpoint paths
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # also EMBER_API_KEY
    scheduler: str = "mlfq"  # skip-join MLFQ (FastServe); fcfs and srpt for comparison
    swap: str = "proactive"  # KV swapping: proactive, reactive or off
    kv_cache_bytes: int | None = None  # None: the engine's default budget
    swap_bytes: int | None = None  # host swap space for preempted jobs' KV blocks
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    max_body_bytes: int = 2 << 20
    max_in_flight: int = 256  # requests in flight before 503 + Retry-After
    shutdown_grace_s: float = 30.0  # in-flight requests get this long to finish on SIGTERM
    home: str | None = None  # EMBER_HOME
    registry: str | None = None  # EMBER_REGISTRY
    log_level: str = "info"
    nodes: int = 1  # embedded nodes of the control plane
    slots: int = 1  # instances per node
    placement: str = "startup-time-aware"  # or random, round-robin, remote-only
    start_timeout_s: float = 300.0  # a request waits this long for a cold start, then 503
    ray: str | None = None  # "auto" or a Ray address: one node per Ray node instead of --nodes

    def validate(self) -> ServeSettings:
        if not self.models:
            raise InvalidRequestError("at least one model to serve", param="model")
        if not 0 < self.port < 65536:
            raise InvalidRequestError(f"port {self.port} is out of range", param="port")
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_body_bytes",
            "max_in_flight",
            "nodes",
            "slots",
        ):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be at least 1", param=name)
        from ember.cluster.placement import POLICIES

        if self.placement not in POLICIES:
            raise InvalidRequestError(
                f"unknown placement {self.placement!r} (one of {', '.join(POLICIES)})", param="placement"
            )
        return self

    def engine_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "scheduler": self.scheduler,
            "swap": self.swap,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
        }
        if self.max_model_len is not None:
            opts["max_model_len"] = self.max_model_len
        if self.kv_cache_bytes is not None:
            opts["kv_cache_bytes"] = self.kv_cache_bytes
        if self.swap_bytes is not None:
            opts["swap_bytes"] = self.swap_bytes
        return opts


def load_settings(config: Path | None, overrides: dict[str, Any]) -> ServeSettings:
    """Defaults, then the TOML file's values, then environment, then flags (not None)."""
    values: dict[str, Any] = {}
    if config is not None:
        try:
            values.update(tomllib.loads(config.read_text()))
        except FileNotFoundError as exc:
            raise InvalidRequestError(f"no config file at {config}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequestError(f"{config}: {exc}") from exc
    known = {f.name for f in fields(ServeSettings)}
    unknown = set(values) - known
    if unknown:
        raise InvalidRequestError(f"{config}: unknown settings {sorted(unknown)}")
    if os.environ.get(env.EMBER_API_KEY):
        values["api_key"] = os.environ[env.EMBER_API_KEY]
    values.update({k: v for k, v in overrides.items() if v is not None and v != []})
    try:
        return dataclasses.replace(ServeSettings(), **values).validate()
    except TypeError as exc:
        raise InvalidRequestError(f"bad settings: {exc}") from exc
