"""`ember serve`'s settings, typed and checked before anything starts.

Each setting is one field of ServeSettings: its type (a Literal for a choice, bounds
as annotated_types), its help (in the type, as Help: its flag's help in cli/serve.py
and its line in docs/serving.md) and its default. Values come in layers, each over
the one before:

    defaults -> ember.toml (--config, keys as the field names) -> EMBER_<NAME>
    variables (env.setting_variable) -> flags

and are validated together by pydantic (load_settings). A value that is not of its
type, an unknown choice or an unknown TOML key is an InvalidRequestError naming the
setting and where its value came from.

ServeSettings is a plain frozen dataclass, and pydantic is imported only to validate:
`ember --help` reads the fields' help and defaults without it (about 0.1 s).

Adding a setting: a field here with its type, help and default, then its flag in
cli/serve.py (`flag("name")`), and its row in docs/serving.md.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_type_hints

from annotated_types import Ge, Gt, Le, MinLen

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

if TYPE_CHECKING:
    from pydantic import ValidationError

DEFAULT_MODEL = "smollm2-135m-instruct"
# cluster/placement.py's POLICIES, by name (tests/server/test_settings.py checks they agree)
PlacementName = Literal["startup-time-aware", "random", "round-robin", "remote-only"]
# store/node.py's DEFAULT_DRAM_BUDGET and DEFAULT_DISK_BUDGET (that module imports torch;
# tests/server/test_settings.py checks they agree)
DEFAULT_DRAM_BYTES = 16 << 30
DEFAULT_DISK_BYTES = 200 << 30
LogLevel = Literal["debug", "info", "warning", "error"]
Positive = Annotated[int, Ge(1)]


@dataclass(frozen=True)
class Help:
    """A setting's help, in its Annotated type: its flag's help (and the docs')."""

    text: str


@dataclass(frozen=True)
class ServeSettings:
    """Everything `ember serve` can be told; docs/serving.md explains each."""

    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012  (pydantic's ConfigDict, as a plain dict)

    models: Annotated[
        list[str],
        MinLen(1),
        Help("Store names or checkpoint directories to serve; clients send the name (a directory's "
             "last part) as `model`."),
    ] = field(default_factory=lambda: [DEFAULT_MODEL])  # fmt: skip
    host: Annotated[str, Help("Address to listen on.")] = "127.0.0.1"
    port: Annotated[int, Ge(1), Le(65535), Help("Port to listen on.")] = 8000
    api_key: Annotated[
        str | None, Help("Require 'Authorization: Bearer KEY' on every route but /health and /metrics.")
    ] = None
    api_key_file: Annotated[
        str | None, Help("Read api_key from this file (its first line), so it need not appear in `ps`.")
    ] = None
    admin_key: Annotated[
        str | None,
        Help("Require this key (and only it: not api_key) on every /admin route, /admin/status "
             "included (unset: the admin routes take api_key)."),
    ] = None  # fmt: skip
    admin_key_file: Annotated[str | None, Help("Read admin_key from this file (its first line).")] = None
    scheduler: Annotated[
        SchedulerName,
        Help("Scheduling policy of every engine: mlfq (skip-join MLFQ), fcfs, srpt (an oracle, for "
             "evaluation), or gittins (Gittins index under the output lengths each instance learns)."),
    ] = DEFAULT_SCHEDULER  # fmt: skip
    swap: Annotated[
        SwapMode, Help("KV swapping of preempted jobs: proactive, reactive, or off (recompute, as vLLM).")
    ] = DEFAULT_SWAP
    kv_cache_bytes: Annotated[
        int | None,
        Gt(0),
        Help("KV cache budget per model, bytes (unset: 512 MiB on CPU, half the free accelerator "
             "memory on CUDA)."),
    ] = None  # fmt: skip
    swap_bytes: Annotated[
        int | None,
        Ge(0),
        Help("Host swap space for preempted jobs' KV blocks, bytes (unset: the KV budget)."),
    ] = None
    max_num_seqs: Annotated[Positive, Help("Most sequences in one batch.")] = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: Annotated[
        Positive, Help("Most tokens computed in one iteration (prefill chunks and decodes).")
    ] = DEFAULT_MAX_NUM_BATCHED_TOKENS
    num_threads: Annotated[
        int | None,
        Ge(1),
        Help("torch's CPU threads in each engine process (unset: the CPUs the process may use, its "
             "affinity capped by its cgroup's quota)."),
    ] = None  # fmt: skip
    max_model_len: Annotated[
        int | None,
        Ge(2),
        Help("Longest prompt + output, tokens (unset: the model's context, at most 8192 and what the "
             "KV budget holds)."),
    ] = None  # fmt: skip
    max_body_bytes: Annotated[Positive, Help("Larger request bodies get 413.")] = 2 << 20
    max_in_flight: Annotated[Positive, Help("Requests in flight before 503 with Retry-After.")] = 256
    shutdown_grace_s: Annotated[
        float, Ge(0), Help("On SIGTERM, seconds the requests in flight get to finish.")
    ] = 30.0
    home: Annotated[
        str | None, Help("Where the store, catalogue and node caches live (unset: ~/.ember).")
    ] = None
    registry: Annotated[
        str | None, Help("Remote registry the nodes fetch from: a directory or an http(s) URL.")
    ] = None
    log_level: Annotated[LogLevel, Help("Log level: debug, info, warning or error.")] = "info"
    nodes: Annotated[Positive, Help("Embedded nodes of the control plane.")] = 1
    slots: Annotated[Positive, Help("Instances each node runs at once.")] = 1
    placement: Annotated[
        PlacementName,
        Help("Where new instances start: startup-time-aware, random, round-robin, or remote-only "
             "(every start downloads)."),
    ] = "startup-time-aware"  # fmt: skip
    no_migration: Annotated[
        bool,
        Help("Never live-migrate a running instance to free a slot (startup-time-aware placement "
             "still weighs starting elsewhere and waiting)."),
    ] = False  # fmt: skip
    dram_bytes: Annotated[
        Positive, Help("Each node's DRAM pool of checkpoints, bytes (least recently used go first).")
    ] = DEFAULT_DRAM_BYTES
    disk_bytes: Annotated[
        Positive, Help("Each node's disk cache of registry copies, bytes (least recently used go first).")
    ] = DEFAULT_DISK_BYTES
    start_timeout_s: Annotated[float, Gt(0), Help("Seconds a request waits for a cold start before 503.")] = (
        300.0
    )
    ray: Annotated[
        str | None,
        Help("Run the nodes on a Ray cluster: 'auto' (the one started here with `ray start --head`) "
             "or its address; one node per Ray node, --slots per CPU-only node."),
    ] = None  # fmt: skip

    def keys(self) -> tuple[str | None, str | None]:
        """The API key and the admin key, each given or read from its file (whose first
        line is the key). InvalidRequestError for a key given both ways, a file that
        cannot be read, or an empty key."""
        return _key(self, "api_key"), _key(self, "admin_key")

    def engine_options(self) -> dict[str, Any]:
        """The EngineConfig fields these settings give every engine."""
        opts: dict[str, Any] = {
            "scheduler": self.scheduler,
            "swap": self.swap,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
        }
        for name in ("max_model_len", "kv_cache_bytes", "swap_bytes", "num_threads"):
            if getattr(self, name) is not None:
                opts[name] = getattr(self, name)
        return opts


SETTINGS = {f.name: f for f in fields(ServeSettings)}


def _key(settings: ServeSettings, name: str) -> str | None:
    key: str | None = getattr(settings, name)
    path: str | None = getattr(settings, f"{name}_file")
    if path is None:
        return key
    if key is not None:
        raise InvalidRequestError(f"give {name} or {name}_file, not both", param=name)
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read {name}_file {path}: {exc}", param=f"{name}_file") from exc
    if not lines or not lines[0].strip():
        raise InvalidRequestError(
            f"{name}_file {path} is empty: its first line is the key", param=f"{name}_file"
        )
    return lines[0].strip()


@functools.cache
def _hints() -> dict[str, Any]:
    return get_type_hints(ServeSettings, include_extras=True)


def help_of(name: str) -> str:
    """A setting's help."""
    return next(m.text for m in _hints()[name].__metadata__ if isinstance(m, Help))


def default_of(name: str) -> Any:
    """A setting's default."""
    f = SETTINGS[name]
    return f.default_factory() if f.default_factory is not MISSING else f.default


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
    for name in SETTINGS:
        variable = setting_variable(name)
        if environ.get(variable):
            raw: Any = environ[variable]
            if name == "models":  # EMBER_MODELS=a,b names several
                raw = [m.strip() for m in raw.split(",") if m.strip()]
            values[name], origin[name] = raw, variable
    for name, value in flags.items():
        if value is not None and value != []:
            values[name], origin[name] = (
                value,
                "--" + ("model" if name == "models" else name).replace("_", "-"),
            )
    from pydantic import TypeAdapter, ValidationError

    try:
        settings = TypeAdapter(ServeSettings).validate_python(values)
    except ValidationError as exc:
        raise _explain(exc, values, origin) from None
    settings.keys()  # a key file that cannot be read fails here, before anything starts
    return settings


def _read_toml(config: Path) -> dict[str, Any]:
    import tomllib

    try:
        values = tomllib.loads(config.read_text())
    except FileNotFoundError as exc:
        raise InvalidRequestError(f"no config file at {config}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequestError(f"{config}: {exc}") from exc
    unknown = sorted(set(values) - set(SETTINGS))
    if unknown:
        raise InvalidRequestError(f"{config}: unknown settings {unknown}; known: {', '.join(SETTINGS)}")
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
