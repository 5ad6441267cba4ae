"""`ember sim`: the serverless cluster simulated in virtual time over the real control
plane's decisions (docs/cluster.md). Prints the per-policy table; --json writes the
report, --plot the TTFT CDF. The simulator is imported when the command runs, so
`--help` stays light."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_POLICIES = "startup-time-aware,random,round-robin,remote-only,startup-time-aware-no-migration"


def sim_cmd(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A TOML file: cluster, bandwidths, model zoo (docs/cluster.md)."),
    ] = None,
    servers: Annotated[int | None, typer.Option(min=1, help="Servers (default 4).")] = None,
    gpus_per_server: Annotated[
        int | None, typer.Option(min=1, help="GPU slots per server (default 8).")
    ] = None,
    models: Annotated[
        int | None,
        typer.Option(min=1, help="Deployments, taking the OPT / Llama-2 zoo's sizes in turn (default 16)."),
    ] = None,
    requests: Annotated[int, typer.Option(min=1, help="Requests to simulate.")] = 1000,
    rate: Annotated[float, typer.Option(help="Requests per second over the cluster.")] = 1.0,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of model popularity.")] = 1.1,
    arrivals: Annotated[str, typer.Option(help="azure, poisson or gamma:<burstiness>.")] = "azure",
    trace: Annotated[
        Path | None,
        typer.Option(help="A cluster trace CSV (arrived_at,model,num_prefill_tokens,num_decode_tokens)."),
    ] = None,
    policies: Annotated[str, typer.Option(help="Comma-separated placement policies.")] = DEFAULT_POLICIES,
    seed: Annotated[int, typer.Option(help="Seed of the workload and the random policy.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the TTFT CDF per policy as a PNG here.")] = None,
) -> None:
    """Simulate the cluster under a multi-model workload with each placement policy:
    TTFT and end-to-end latency, cold starts by tier, migrations, and the simulator's
    own speed (simulated requests per wall second)."""
    from ember.bench.cluster_report import plot_ttft_cdf, render_table
    from ember.sim.config import load_config
    from ember.sim.run import WorkloadSpec, make_workload, parse_policies, run_policies

    names = parse_policies(policies)
    cfg = load_config(config, servers=servers, gpus_per_server=gpus_per_server, models=models)
    spec = WorkloadSpec(requests=requests, rate=rate, zipf=zipf, arrivals=arrivals, trace=trace)
    workload = make_workload(cfg, spec, seed)
    report, outcomes = run_policies(cfg, workload, names, seed=seed)
    typer.echo(render_table(report))
    speed = ", ".join(f"{n} {p['sim_requests_per_wall_s']}" for n, p in report["policies"].items())
    typer.echo(f"simulated requests per wall second: {speed}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if plot is not None:
        c = report["config"]
        title = f"ember sim: {c['servers']} servers x {c['gpus_per_server']} GPUs, {c['models']} models"
        plot_ttft_cdf(outcomes, plot, title)
