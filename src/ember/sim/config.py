"""The simulated cluster and model zoo, as data: defaults, a TOML file, flags.

Defaults follow ServerlessLLM's evaluation (Fu et al., OSDI'24, §7) as far as the paper
states them; where it does not, the number is an estimate and says so:

- A server: 8 GPUs of 24 GB (the paper's single-server testbed: 8 NVIDIA A5000s),
  1 TB of DRAM (the paper's 1 TB DDR4; 512 GB of it as the checkpoint pool, our
  choice), 4 TB of NVMe SSD (the paper's RAID-0 NVMe; capacity our estimate).
- Bandwidths into GPU memory: DRAM 20 GB/s (PCIe 4.0 x16 is 32 GB/s raw; ServerlessLLM
  reports loading near PCIe bandwidth: estimate), SSD 6 GB/s (a PCIe 4.0 NVMe's
  sequential read; estimate), network 1.25 GB/s (the paper's 10 Gbps cluster network,
  which its Ray Serve / KServe baselines download checkpoints over). Those baselines
  then load the downloaded checkpoint with a standard loader: ServerlessLLM measures
  its own loader 3.6-8.2x faster than safetensors and PyTorch from the same SSD, so
  `remote-only+safetensors` loads at 1 GB/s after its download (6 GB/s over about 6:
  estimate); plain `remote-only` streams the download with Ember's loader.
- Models: OPT-6.7B/13B/30B/66B and Llama-2-7B/13B/70B at 2 bytes a parameter (fp16),
  the parameter counts their model cards give.
- Inference: no per-model measurement on A5000s is published, so each model's costs
  are a roofline estimate: a decode step reads every weight once at 70% of an A5000's
  768 GB/s across the instance's GPUs; prefill costs 2 FLOPs a parameter a token at
  40% of its ~55 dense fp16 TFLOP/s (vLLM's and ServerlessLLM's reported per-token
  latencies for 7-13B models on such GPUs are tens of ms, the same order).
A TOML file overrides any of it (docs/cluster.md shows one).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ember.errors import InvalidRequestError

GB = 10**9

# name -> parameters (model cards); bytes = 2 x parameters (fp16)
ZOO_PARAMS: dict[str, float] = {
    "opt-6.7b": 6.7e9,
    "llama-2-7b": 6.74e9,
    "opt-13b": 12.85e9,
    "llama-2-13b": 13.0e9,
    "opt-30b": 30.0e9,
    "opt-66b": 66.0e9,
    "llama-2-70b": 68.98e9,
}
GPU_MEM_BW = 768e9  # bytes/s, an A5000's memory bandwidth (its data sheet)
GPU_FLOPS = 55e12  # dense fp16 tensor FLOP/s, roughly an A5000's (estimate)


@dataclass(frozen=True)
class ServerSpec:
    gpus: int = 8
    gpu_bytes: int = 24 * GB
    dram_bytes: int = 512 * GB  # the checkpoint pool in DRAM
    ssd_bytes: int = 4000 * GB
    dram_bps: float = 20e9  # bytes/s, DRAM -> GPU
    ssd_bps: float = 6e9  # bytes/s, SSD -> GPU
    network_bps: float = 1.25e9  # bytes/s, registry -> GPU (10 Gbps)
    baseline_load_bps: float = 1e9  # bytes/s, a standard loader, SSD -> GPU (remote-only+safetensors)
    overhead_s: float = 0.5  # building the model and engine once the weights are in (estimate)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the deployment's name
    nbytes: int
    slots: int  # GPUs of one server an instance takes
    prefill_s_per_token: float
    decode_s_per_step: float


@dataclass(frozen=True)
class SimConfig:
    servers: int = 4
    server: ServerSpec = field(default_factory=ServerSpec)
    models: tuple[ModelSpec, ...] = ()
    keep_alive_s: float = 10.0
    max_batch: int = 8  # requests an instance serves at once; more wait at the instance
    max_instances: int = 4  # per deployment
    start_timeout_s: float = 300.0  # a request waiting longer for an instance times out
    migration_s_per_token: float = 2e-4  # MigrationCost's a (recompute per token; estimate)
    migration_fixed_s: float = 0.05  # MigrationCost's b
    # bytes/s of one link in front of the registry that all downloads share (0: none, each
    # server downloads at its own network_bps); bench cluster --registry-gbps runs have one
    registry_link_bps: float = 0.0


def zoo_model(base: str, name: str, server: ServerSpec) -> ModelSpec:
    """A deployment `name` of zoo model `base`, its slots and latency by the roofline."""
    params = ZOO_PARAMS[base]
    nbytes = int(2 * params)
    usable = 0.9 * server.gpu_bytes  # the rest for activations and a minimal KV cache
    slots = 2 ** math.ceil(math.log2(max(1.0, nbytes / usable)))  # tensor parallel degree: a power of 2
    if slots > server.gpus:
        raise InvalidRequestError(
            f"{base} ({nbytes / GB:.0f} GB) needs {slots} GPUs of {server.gpu_bytes / GB:.0f} GB; "
            f"a server has {server.gpus}",
            param="models",
        )
    decode = nbytes / (slots * GPU_MEM_BW * 0.7)
    prefill = 2 * params / (slots * GPU_FLOPS * 0.4)
    return ModelSpec(name, nbytes, slots, prefill, decode)


def default_models(
    count: int, server: ServerSpec, mix: tuple[str, ...] | None = None
) -> tuple[ModelSpec, ...]:
    """`count` deployments taking the zoo's models in turn ("opt-6.7b-0", ...)."""
    names = mix or tuple(ZOO_PARAMS)
    return tuple(
        zoo_model(names[i % len(names)], f"{names[i % len(names)]}-{i}", server) for i in range(count)
    )


def _section(data: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidRequestError(f"{where}: unknown keys {', '.join(unknown)}", param="config")
    return data


def load_config(path: str | Path | None, base: SimConfig | None = None, **overrides: Any) -> SimConfig:
    """`base` (the defaults when None; `ember sim --from-bench` passes the real run's),
    then the TOML file at `path` over it, then the flags given (None: unset).
    TOML: top-level SimConfig keys, [server] ServerSpec keys, [zoo] mix = [...] and
    count = N, or [[models]] tables with ModelSpec keys (a `base` zoo name fills the rest).
    The models stay `base`'s unless the file or the --models flag names others."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise InvalidRequestError(f"no config at {path}", param="config") from e
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise InvalidRequestError(f"cannot read the config {path}: {e}", param="config") from e
    try:
        return _build(data, {k: v for k, v in overrides.items() if v is not None}, base or SimConfig())
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"bad config: {e}", param="config") from e


def _build(data: dict[str, Any], flags: dict[str, Any], base: SimConfig) -> SimConfig:
    server = replace(base.server, **_section(dict(data.pop("server", {})), ServerSpec, "[server]"))
    if "gpus_per_server" in flags:
        server = replace(server, gpus=flags.pop("gpus_per_server"))
    zoo = dict(data.pop("zoo", {}))
    model_tables = data.pop("models", None)
    top = _section(data, SimConfig, "the top level")
    count = flags.pop("models", None)
    config = replace(replace(base, **top), server=server, **flags)
    if model_tables is not None and count is None:
        models = tuple(_model_from_table(t, server) for t in model_tables)
    elif count is None and not zoo and base.models:
        models = base.models
    else:
        mix = tuple(zoo["mix"]) if "mix" in zoo else None
        models = default_models(int(count or zoo.get("count", 16)), server, mix)
    config = replace(config, models=models)
    validate(config)
    return config


def _model_from_table(table: dict[str, Any], server: ServerSpec) -> ModelSpec:
    table = dict(table)
    base = table.pop("base", None)
    if base is not None:
        if base not in ZOO_PARAMS:
            raise InvalidRequestError(f"unknown zoo model {base!r} (one of {', '.join(ZOO_PARAMS)})")
        return replace(zoo_model(base, table.get("name", base), server), **table)
    return ModelSpec(**_section(table, ModelSpec, "[[models]]"))


def validate(config: SimConfig) -> None:
    s = config.server
    checks = [
        (config.servers >= 1, "servers must be >= 1"),
        (s.gpus >= 1, "gpus per server must be >= 1"),
        (min(s.dram_bps, s.ssd_bps, s.network_bps) > 0, "bandwidths must be positive"),
        (s.dram_bytes >= 0 and s.ssd_bytes >= 0 and s.overhead_s >= 0, "capacities must be >= 0"),
        (config.registry_link_bps >= 0, "registry_link_bps must be >= 0"),
        (config.keep_alive_s >= 0 and config.max_batch >= 1 and config.max_instances >= 1, "bad scaling"),
        (len(config.models) >= 1, "need at least one model"),
        (len({m.name for m in config.models}) == len(config.models), "model names must be unique"),
    ]
    for ok, message in checks:
        if not ok:
            raise InvalidRequestError(f"bad simulator config: {message}", param="config")
    for m in config.models:
        if not (1 <= m.slots <= s.gpus and m.nbytes > 0):
            raise InvalidRequestError(
                f"model {m.name}: slots must be 1-{s.gpus} and nbytes > 0", param="config"
            )
        if not (m.prefill_s_per_token >= 0 and m.decode_s_per_step >= 0):
            raise InvalidRequestError(f"model {m.name}: latencies must be >= 0", param="config")
