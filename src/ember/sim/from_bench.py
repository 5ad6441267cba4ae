"""`ember sim --from-bench RESULT.json`: the simulator configured as a real `ember bench
cluster` run was, to replay its workload and compare (sim/compare.py).

From the bench's JSON (bench/cluster.py's `ClusterReport.to_json`):

- the cluster: servers = its nodes, GPUs per server = its slots, the DRAM pool and SSD
  cache = its --dram-bytes / --disk-bytes, keep-alive, max batch (the engine's
  max_num_seqs), max instances (1) and the start time-out;
- the models: names, bytes, slots an instance takes;
- physics, by default one set for every policy (pooled over the policies' runs, so
  that the simulator's policies differ only by their decisions), or with `policy`
  each policy's from its own run alone (the machine may have been busier during one
  policy's run than another's: `ember sim --calibrate per-policy`):
  per tier the median bytes/s of the measured loads, weighted by how many loads each
  policy's median stands for; where no policy loaded from a tier, the median of the
  estimator's per-node snapshots; the overhead (engine build: startup - load) the
  load-weighted median of the tiers' medians; per model the warm-request-weighted
  median prefill s/token and decode s/step, and for a model no request found warm,
  the other models' median cost per byte times its bytes;
- the workload: the trace the run sent ("trace"), exactly.

The machine the real nodes share (2 cores, one disk, one page cache) is modelled by
its measurements only: the bandwidths are those of loads that ran under the run's own
contention, and the inference costs were measured under the run's own concurrency. Each
simulated server still loads one model at a time at that bandwidth, independently of
the others (docs/cluster.md, "Validating the simulator", says why).

Fields this module needs that JSONs from before the trace was recorded lack (max_batch,
max_instances, start_timeout_s, a model's slots) take the bench CLI's values of the time,
each listed in `BenchRun.assumed`; a missing required field is an InvalidRequestError
naming it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from ember.bench.cluster_workload import CLUSTER_COLUMNS, ClusterRequest
from ember.cluster.migration_cost import PRIOR_FIXED_S, PRIOR_S_PER_TOKEN
from ember.errors import InvalidRequestError
from ember.sim.config import ModelSpec, ServerSpec, SimConfig, validate

PARAM = "from_bench"
TIERS = ("dram", "disk", "registry")  # bench tiers: ServerSpec's dram_bps, ssd_bps, network_bps
# What bench cluster ran with before its JSON recorded these (cli/bench_cluster.py's ENGINE,
# server.deploy's max-instances, ClusterShape's time-out; every instance took one slot).
LEGACY = {"max_batch": 8, "max_instances": 1, "start_timeout_s": 300.0}


@dataclass
class BenchRun:
    """A real run, read: the SimConfig that replays it, its trace (None: not recorded),
    the real per-policy summaries, and the values assumed for fields it lacks."""

    config: SimConfig
    trace: list[ClusterRequest] | None
    real: dict[str, dict[str, Any]]
    assumed: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)  # where each physics number came from
    data: Mapping[str, Any] = field(default_factory=dict)  # the JSON read


def read_bench_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise InvalidRequestError(f"no bench result at {path}", param=PARAM) from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"cannot read the bench result {path}: {e}", param=PARAM) from e
    if not isinstance(data, dict) or data.get("benchmark") != "cluster":
        raise InvalidRequestError(
            f"{path} is not an `ember bench cluster` JSON (benchmark: cluster)", param=PARAM
        )
    return data


def load_bench(path: str | Path) -> BenchRun:
    """The run at `path` (a bench cluster JSON) as a BenchRun."""
    return bench_run(read_bench_json(path))


def bench_run(data: Mapping[str, Any], policy: str | None = None) -> BenchRun:
    """The run `data` describes, its physics pooled over every policy's run, or (`policy`)
    from that policy's run alone (`ember sim --calibrate per-policy`)."""
    assumed: list[str] = []
    cluster = _get(data, "cluster", dict)
    policies = _get(data, "policies", dict)
    if not policies:
        raise InvalidRequestError("the bench JSON's field policies holds no policy", param=PARAM)
    if policy is not None and policy not in policies:
        raise InvalidRequestError(f"the bench JSON has no run of policy {policy!r}", param="policies")
    names = list(policies) if policy is None else [policy]
    summaries = {name: _get(policies, name, dict, f"policies.{name}") for name in names}
    server, calibration = _server(cluster, summaries)
    if policy is not None and not _pooled_costs(summaries):  # every request of its run waited for a start
        assumed.append(f"{policy}: no request found an instance warm: inference costs pooled over every run")
        summaries_for_costs = {name: _get(policies, name, dict, f"policies.{name}") for name in policies}
    else:
        summaries_for_costs = summaries
    models = _models(data, summaries_for_costs, assumed)
    top = {k: _legacy(cluster, k, assumed) for k in LEGACY}
    config = SimConfig(
        servers=int(_number(cluster, "nodes", "cluster.nodes")),
        server=server,
        models=tuple(models),
        keep_alive_s=_number(cluster, "keep_alive_s", "cluster.keep_alive_s"),
        max_batch=int(top["max_batch"]),
        max_instances=int(top["max_instances"]),
        start_timeout_s=float(top["start_timeout_s"]),
        migration_s_per_token=PRIOR_S_PER_TOKEN,  # the real run's MigrationCost() is never observed
        migration_fixed_s=PRIOR_FIXED_S,
        registry_link_bps=float(cluster.get("registry_bps") or 0.0),  # --registry-gbps
    )
    try:
        validate(config)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"the bench JSON gives {e.message}", param=PARAM) from e
    calibration["inference"] = {m.name: [m.prefill_s_per_token, m.decode_s_per_step] for m in models}
    return BenchRun(config, trace_from_bench(data), dict(policies), assumed, calibration, data)


def code_note(data: Mapping[str, Any], ours: str | None) -> str | None:
    """A warning when the real run ran other code than this simulator's (or says not)."""
    theirs = data.get("code")
    if not isinstance(theirs, str):
        return "the bench JSON does not say which code it ran (field code): its control plane may differ"
    if ours is not None and theirs != ours:
        return (
            f"the real run ran code {theirs}, this is {ours}: "
            "a control-plane change between them is simulated, not measured"
        )
    return None


def trace_from_bench(data: Mapping[str, Any]) -> list[ClusterRequest] | None:
    """The requests the run sent, in order (None when the JSON records no trace)."""
    rows = data.get("trace")
    if rows is None:
        return None
    if not isinstance(rows, list) or not rows:
        raise InvalidRequestError("the bench JSON's field trace must be a non-empty list", param=PARAM)
    out = []
    for i, row in enumerate(rows):
        where = f"trace[{i}]"
        if not isinstance(row, dict):
            raise InvalidRequestError(f"the bench JSON's field {where} must be an object", param=PARAM)
        arrival, model, prompt, output = (row.get(c) for c in CLUSTER_COLUMNS)
        if not isinstance(model, str) or not model:
            raise InvalidRequestError(f"the bench JSON's field {where}.model must be a name", param=PARAM)
        if not (_is_number(arrival) and arrival >= 0 and _count(prompt) and _count(output)):
            raise InvalidRequestError(
                f"the bench JSON's field {where} needs arrived_at >= 0 and token counts >= 1", param=PARAM
            )
        out.append(ClusterRequest(float(arrival), model, prompt, output))
    return out


# -- the pieces ------------------------------------------------------------------------


def _server(
    cluster: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]]
) -> tuple[ServerSpec, dict[str, Any]]:
    bps: dict[str, float] = {}
    source: dict[str, str] = {}
    overheads: list[tuple[float, int]] = []
    for tier in TIERS:
        loads = [_tier_loads(s, tier, name) for name, s in summaries.items()]
        measured = [(rate, n) for rate, _, n in loads if rate is not None and n > 0]
        overheads += [(o, n) for _, o, n in loads if o is not None and n > 0]
        if measured:
            bps[tier], source[tier] = weighted_median(measured), f"{sum(n for _, n in measured)} loads"
            continue
        snapshot = [b[tier] for s in summaries.values() for b in _snapshots(s) if _is_number(b.get(tier))]
        if not snapshot:
            raise InvalidRequestError(
                f"the bench JSON has no {tier} load and no estimator bandwidth for it "
                f"(fields policies.*.loads.{tier}, policies.*.bandwidths)",
                param=PARAM,
            )
        bps[tier], source[tier] = statistics.median(snapshot), "estimator snapshot"
    server = ServerSpec(
        gpus=int(_number(cluster, "slots", "cluster.slots")),
        dram_bytes=int(_number(cluster, "dram_bytes", "cluster.dram_bytes")),
        ssd_bytes=int(_number(cluster, "disk_bytes", "cluster.disk_bytes")),
        dram_bps=bps["dram"],
        ssd_bps=bps["disk"],
        network_bps=bps["registry"],
        overhead_s=weighted_median(overheads) if overheads else 0.0,
    )
    calibration = {"bytes_per_s": bps, "bytes_per_s_from": source, "overhead_s": server.overhead_s}
    return server, calibration


def _tier_loads(summary: Mapping[str, Any], tier: str, name: str) -> tuple[float | None, float | None, int]:
    """(median bytes/s, median overhead s, loads) of one policy's loads from `tier`."""
    loads = _get(summary, "loads", dict, f"policies.{name}.loads")
    entry = loads.get(tier, {"loads": 0})
    if not isinstance(entry, dict) or not isinstance(entry.get("loads"), int):
        raise InvalidRequestError(
            f"the bench JSON's field policies.{name}.loads.{tier}.loads must be a count", param=PARAM
        )
    rate, overhead = entry.get("bytes_per_s"), entry.get("overhead_s")
    return (
        float(rate) if _is_number(rate) and rate > 0 else None,
        float(overhead) if _is_number(overhead) and overhead >= 0 else None,
        int(entry["loads"]),
    )


def _snapshots(summary: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    nodes = summary.get("bandwidths")
    return [b for b in nodes.values() if isinstance(b, dict)] if isinstance(nodes, dict) else []


def _models(
    data: Mapping[str, Any], summaries: Mapping[str, Mapping[str, Any]], assumed: list[str]
) -> list[ModelSpec]:
    entries = _get(data, "models", list)
    if not entries:
        raise InvalidRequestError("the bench JSON's field models holds no model", param=PARAM)
    costs = _pooled_costs(summaries)
    per_byte = _per_byte(costs, entries)
    models = []
    for i, m in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise InvalidRequestError(f"the bench JSON's field {where}.name is missing", param=PARAM)
        nbytes = int(_number(m, "nbytes", f"{where}.nbytes"))
        if "slots" not in m and "slots: 1 a model (every bench instance took one)" not in assumed:
            assumed.append("slots: 1 a model (every bench instance took one)")
        slots = int(_number(m, "slots", f"{where}.slots")) if "slots" in m else 1
        prefill, decode = costs.get(m["name"]) or (per_byte[0] * nbytes, per_byte[1] * nbytes)
        if m["name"] not in costs:
            assumed.append(f"{m['name']}: never warm; inference costs: the others' per byte")
        models.append(ModelSpec(m["name"], nbytes, slots, prefill, decode))
    return models


def _pooled_costs(summaries: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per model (prefill s/token, decode s/step): each policy's medians, weighted by its
    warm requests."""
    per: dict[str, tuple[list[tuple[float, int]], list[tuple[float, int]]]] = {}
    for policy, s in summaries.items():
        for name, c in _get(s, "inference", dict, f"policies.{policy}.inference").items():
            n = c.get("warm_requests") if isinstance(c, dict) else None
            if not isinstance(n, int) or n < 1:
                continue
            prefill, decode = per.setdefault(name, ([], []))
            if _is_number(c.get("prefill_s_per_token")):
                prefill.append((float(c["prefill_s_per_token"]), n))
            if _is_number(c.get("decode_s_per_step")):
                decode.append((float(c["decode_s_per_step"]), n))
    return {name: (weighted_median(p), weighted_median(d) if d else 0.0) for name, (p, d) in per.items() if p}


def _per_byte(costs: Mapping[str, tuple[float, float]], entries: Sequence[Any]) -> tuple[float, float]:
    sizes = {m["name"]: m.get("nbytes") for m in entries if isinstance(m, dict) and "name" in m}
    ratios = [(p / n, d / n) for name, (p, d) in costs.items() if _is_number(n := sizes.get(name)) and n > 0]
    if not ratios:
        raise InvalidRequestError(
            "the bench JSON's field policies.*.inference has no model's prefill/decode costs", param=PARAM
        )
    return statistics.median(r[0] for r in ratios), statistics.median(r[1] for r in ratios)


def weighted_median(pairs: Iterable[tuple[float, int]]) -> float:
    """The median of values each repeated `weight` times (the lower middle on a tie)."""
    items = sorted(pairs)
    total = sum(w for _, w in items)
    if not items or total <= 0:
        raise ValueError("weighted_median of nothing")
    seen = 0
    for value, weight in items:
        seen += weight
        if 2 * seen >= total:
            return value
    return items[-1][0]


def _legacy(cluster: Mapping[str, Any], key: str, assumed: list[str]) -> float:
    if key in cluster:
        return _number(cluster, key, f"cluster.{key}")
    assumed.append(f"{key}: {LEGACY[key]:g} (the bench's value before its JSON recorded it)")
    return LEGACY[key]


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(data: Mapping[str, Any], key: str, where: str) -> float:
    value = data.get(key)
    if not _is_number(value) or value < 0:
        state = "is missing" if value is None else f"must be a number >= 0, got {value!r}"
        raise InvalidRequestError(f"the bench JSON's field {where} {state}", param=PARAM)
    return float(value)


def _get(data: Mapping[str, Any], key: str, kind: type, where: str | None = None) -> Any:
    value = data.get(key)
    if not isinstance(value, kind):
        state = "is missing" if value is None else f"must be a {kind.__name__}"
        raise InvalidRequestError(f"the bench JSON's field {where or key} {state}", param=PARAM)
    return value
