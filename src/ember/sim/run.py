"""One `ember sim` run: the same workload through every policy, and the report."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ember.bench.cluster_report import RequestOutcome, policy_summary
from ember.bench.cluster_workload import ClusterRequest, generate_cluster_workload, read_cluster_trace
from ember.errors import InvalidRequestError
from ember.sim.config import SimConfig
from ember.sim.from_bench import BenchRun
from ember.sim.simulator import POLICIES, Simulator

DEFAULT_REQUESTS = 1000


@dataclass(frozen=True)
class WorkloadSpec:
    requests: int = DEFAULT_REQUESTS  # 0: all of a bench run's recorded trace
    rate: float = 2.0  # requests/s over the whole cluster
    zipf: float = 1.1
    arrivals: str = "azure"
    trace: Path | None = None  # a cluster trace instead of a generated workload


def run_each(
    configs: Mapping[str, SimConfig], workload: Sequence[ClusterRequest], *, seed: int
) -> tuple[dict[str, Any], dict[str, list[RequestOutcome]]]:
    """run_policies, each policy under its own config (`--calibrate per-policy`); the
    report's "config" is the first policy's."""
    report: dict[str, Any] = {}
    outcomes: dict[str, list[RequestOutcome]] = {}
    for name, config in configs.items():
        one, outs = run_policies(config, workload, [name], seed=seed)
        report = report or one
        report["policies"].update(one["policies"])
        outcomes.update(outs)
    return report, outcomes


def make_workload(config: SimConfig, spec: WorkloadSpec, seed: int) -> list[ClusterRequest]:
    """The trace's first `requests` rows, or a generated workload over the config's
    models (the first model the most popular)."""
    if spec.trace is not None:
        return read_cluster_trace(spec.trace, num_requests=spec.requests)
    names = [m.name for m in config.models]
    return generate_cluster_workload(
        names, requests=spec.requests, rate=spec.rate, zipf=spec.zipf, seed=seed, arrivals=spec.arrivals
    )


def bench_workload(
    run: BenchRun, config: SimConfig, spec: WorkloadSpec, *, generate: bool, seed: int
) -> list[ClusterRequest]:
    """The workload of `ember sim --from-bench`: the real run's recorded trace (its first
    `spec.requests` when given), unless --trace or a generation flag asks otherwise."""
    if spec.trace is not None or generate:
        return make_workload(config, replace(spec, requests=spec.requests or DEFAULT_REQUESTS), seed)
    if run.trace is None:
        raise InvalidRequestError(
            "the bench JSON records no trace (field trace; bench cluster records it since the "
            "simulator's validation): give the requests it sent with --trace CSV",
            param="trace",
        )
    return run.trace[: spec.requests] if spec.requests else list(run.trace)


def from_bench_report(run: BenchRun, path: Path) -> dict[str, Any]:
    """What the report says of the real run the config came from."""
    return {"path": str(path), "assumed": run.assumed, "calibration": run.calibration}


def parse_policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown or not names:
        raise InvalidRequestError(
            f"unknown policies {', '.join(unknown) or '(none)'}: choose from {', '.join(POLICIES)}",
            param="policies",
        )
    return names


def run_policies(
    config: SimConfig, workload: Sequence[ClusterRequest], policies: Sequence[str], *, seed: int
) -> tuple[dict[str, Any], dict[str, list[RequestOutcome]]]:
    """({"config": ..., "policies": {name: summary}}, outcomes per policy). Each summary
    has bench cluster's fields plus wall_s, virtual_s and sim_requests_per_wall_s."""
    report: dict[str, Any] = {"config": describe(config, len(workload), seed), "policies": {}}
    outcomes: dict[str, list[RequestOutcome]] = {}
    for name in policies:
        sim = Simulator(config, name, seed=seed)
        began = time.perf_counter()
        outs = sim.run(workload)
        wall = time.perf_counter() - began
        extra = {
            "wall_s": round(wall, 3),
            "virtual_s": round(sim.now, 3),
            "sim_requests_per_wall_s": round(len(workload) / wall) if wall > 0 else None,
        }
        report["policies"][name] = policy_summary(
            outs, starts=sim.starts, migrations=sim.migrations, reclaims=sim.reclaims, extra=extra
        )
        outcomes[name] = outs
    return report, outcomes


def describe(config: SimConfig, requests: int, seed: int) -> dict[str, Any]:
    s = config.server
    return {
        "servers": config.servers,
        "gpus_per_server": s.gpus,
        "models": len(config.models),
        "requests": requests,
        "seed": seed,
        "dram_bytes": s.dram_bytes,
        "ssd_bytes": s.ssd_bytes,
        "bytes_per_s": {"dram": s.dram_bps, "disk": s.ssd_bps, "registry": s.network_bps},
        "keep_alive_s": config.keep_alive_s,
    }
