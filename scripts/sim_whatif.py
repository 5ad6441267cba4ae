"""What-ifs around a real `ember bench cluster` run: the simulator configured from the
run (its cluster, measured bandwidths and inference costs), each regime replaying
`--seeds` generated workloads of the run's shape; prints each policy's mean TTFT and
startup-time-aware's ratio to random and to remote-only (means over the workloads).

    python scripts/sim_whatif.py data/sim/bench-cluster-4x1-1g-e.json [--seeds 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

from ember.bench.cluster_workload import generate_cluster_workload
from ember.sim.config import SimConfig
from ember.sim.from_bench import load_bench
from ember.sim.run import run_policies

POLICIES = ["startup-time-aware", "random", "remote-only"]


def regime(name: str, config: SimConfig, seeds: int, *, rate: float = 1.0, zipf: float = 1.1) -> None:
    ttft: dict[str, list[float]] = {p: [] for p in POLICIES}
    for seed in range(seeds):
        workload = generate_cluster_workload(
            [m.name for m in config.models], requests=150, rate=rate, zipf=zipf, seed=seed,
            arrivals="azure", prompt_scale=0.25, output_scale=0.1,
        )  # fmt: skip
        report, _ = run_policies(config, workload, POLICIES, seed=seed)
        for p in POLICIES:
            ttft[p].append(report["policies"][p]["mean_ttft_s"])
    sta = ttft[POLICIES[0]]
    ratios = [statistics.mean(a / b for a, b in zip(sta, ttft[p], strict=True)) for p in POLICIES[1:]]
    means = "  ".join(f"{p} {statistics.mean(v):.3f}" for p, v in ttft.items())
    print(f"{name:36s} {means}  /random {ratios[0]:.2f}  /remote-only {ratios[1]:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="an `ember bench cluster` JSON")
    parser.add_argument("--seeds", type=int, default=8, help="generated workloads per regime")
    args = parser.parse_args()
    base = load_bench(args.run).config

    def servers(**change: int) -> SimConfig:
        return dataclasses.replace(base, server=dataclasses.replace(base.server, **change))

    regime("as run", base, args.seeds)
    regime("2 slots a node", servers(gpus=2), args.seeds)
    regime("DRAM 1 GB a node", servers(dram_bytes=10**9), args.seeds)
    regime("rate 0.5", base, args.seeds, rate=0.5)
    regime("Zipf 1.2", base, args.seeds, zipf=1.2)
    regime("twice the nodes", dataclasses.replace(base, servers=2 * base.servers), args.seeds)
    regime("keep-alive 30 s", dataclasses.replace(base, keep_alive_s=30.0), args.seeds)


if __name__ == "__main__":
    main()
