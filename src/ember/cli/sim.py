"""`ember sim`: the serverless cluster simulated in virtual time over the real control
plane's decisions (docs/cluster.md). Prints the per-policy table; --json writes the
report, --plot the TTFT CDF. The simulator is imported when the command runs, so
`--help` stays light."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ember.errors import InvalidRequestError
from ember.sim.compare import DEFAULT_SPREAD, DEFAULT_TOLERANCE

if TYPE_CHECKING:  # the simulator loads when the command runs
    from ember.bench.cluster_workload import ClusterRequest
    from ember.sim.config import SimConfig
    from ember.sim.from_bench import BenchRun
    from ember.sim.run import WorkloadSpec

DEFAULT_POLICIES = ",".join(
    [
        "startup-time-aware",
        "random",
        "round-robin",
        "remote-only",
        "startup-time-aware-no-migration",
        "remote-only+safetensors",
    ]
)


def sim_cmd(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A TOML file: cluster, bandwidths, model zoo (docs/cluster.md)."),
    ] = None,
    from_bench: Annotated[
        Path | None,
        typer.Option(
            "--from-bench",
            help="An `ember bench cluster` JSON: simulate that run (its cluster, measured bandwidths and "
            "inference costs, its trace); --config and flags still override.",
        ),
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="With --from-bench: real vs simulated per policy, and ordering.")
    ] = False,
    repeat: Annotated[
        list[Path] | None,
        typer.Option(
            "--repeat",
            help="--compare: a repeat of the --from-bench run (same cluster and trace; may be given again): "
            "the real figures are averaged and the spread measured.",
        ),
    ] = None,
    spread: Annotated[
        float,
        typer.Option(min=0.0, help="--compare: assumed run-to-run spread of a mean TTFT (relative)."),
    ] = DEFAULT_SPREAD,
    calibrate: Annotated[
        str,
        typer.Option(
            help="--from-bench: 'per-policy' (each policy simulated with the bandwidths and inference costs "
            "its own real run measured) or 'pooled' (one set over every policy's run)."
        ),
    ] = "per-policy",
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="--compare: allowed |sim/real - 1| of mean TTFT.")
    ] = DEFAULT_TOLERANCE,
    servers: Annotated[int | None, typer.Option(min=1, help="Servers (default 4).")] = None,
    gpus_per_server: Annotated[
        int | None, typer.Option(min=1, help="GPU slots per server (default 8).")
    ] = None,
    models: Annotated[
        int | None,
        typer.Option(min=1, help="Deployments, taking the OPT / Llama-2 zoo's sizes in turn (default 16)."),
    ] = None,
    requests: Annotated[
        int | None,
        typer.Option(min=1, help="Requests to simulate (default 1000; a bench run's whole trace)."),
    ] = None,
    rate: Annotated[float | None, typer.Option(help="Requests per second over the cluster (1.0).")] = None,
    zipf: Annotated[float | None, typer.Option(help="Zipf exponent of model popularity (1.1).")] = None,
    arrivals: Annotated[str | None, typer.Option(help="azure, poisson or gamma:<burstiness>.")] = None,
    trace: Annotated[
        Path | None,
        typer.Option(help="A cluster trace CSV (arrived_at,model,num_prefill_tokens,num_decode_tokens)."),
    ] = None,
    policies: Annotated[
        str | None, typer.Option(help=f"Comma-separated placement policies [{DEFAULT_POLICIES}].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the workload and the random policy.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the TTFT CDF per policy as a PNG here.")] = None,
) -> None:
    """Simulate the cluster under a multi-model workload with each placement policy:
    TTFT and end-to-end latency, cold starts by tier, migrations, and the simulator's
    own speed (simulated requests per wall second). --from-bench replays a real
    `ember bench cluster` run; --compare sets the simulation beside it."""
    from ember.bench.cluster_report import plot_ttft_cdf, render_table
    from ember.sim.config import load_config
    from ember.sim.run import WorkloadSpec, from_bench_report, parse_policies, run_policies

    if compare and from_bench is None:
        raise InvalidRequestError("--compare compares with a real run: give --from-bench RESULT.json")
    if repeat and not compare:
        raise InvalidRequestError("--repeat gives repeats of the real run to --compare", param="repeat")
    generate = any(v is not None for v in (rate, zipf, arrivals))
    spec = WorkloadSpec(
        requests=requests or (0 if from_bench and not generate else 1000), rate=1.0 if rate is None else rate,
        zipf=1.1 if zipf is None else zipf, arrivals=arrivals or "azure", trace=trace,
    )  # fmt: skip
    flags = {"servers": servers, "gpus_per_server": gpus_per_server, "models": models}
    if calibrate not in ("pooled", "per-policy"):
        raise InvalidRequestError(
            f"--calibrate takes pooled or per-policy, not {calibrate!r}", param="calibrate"
        )
    cfg, workload, run = _setup(config, from_bench, flags, spec, generate, seed)
    names = parse_policies(policies or (",".join(run.real) if run is not None else DEFAULT_POLICIES))
    for note in run.assumed if run is not None else ():
        typer.echo(f"assumed: {note}")
    if run is not None:
        _code_note(run)

    def simulate(bench: BenchRun | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The policies over the workload under `bench`'s physics (or the config's)."""
        if calibrate == "per-policy" and bench is not None:
            return _per_policy(bench, names, config, flags, workload, seed)
        base = cfg if bench is run or bench is None else load_config(config, bench.config, **flags)
        return run_policies(base, workload, names, seed=seed)

    report, outcomes = simulate(run)
    typer.echo(render_table(report))
    speed = ", ".join(f"{n} {p['sim_requests_per_wall_s']}" for n, p in report["policies"].items())
    typer.echo(f"simulated requests per wall second: {speed}")
    if run is not None and from_bench is not None:
        report["config"]["from_bench"] = from_bench_report(run, from_bench)
        if compare:
            _compare(report, run, repeat or [], simulate, tolerance=tolerance, spread=spread)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    if plot is not None:
        c = report["config"]
        title = f"ember sim: {c['servers']} servers x {c['gpus_per_server']} GPUs, {c['models']} models"
        plot_ttft_cdf(outcomes, plot, title)


def _code_note(run: BenchRun) -> None:
    from ember.bench.code_version import code_commit
    from ember.sim.from_bench import code_note

    note = code_note(run.data, code_commit())
    if note is not None:
        typer.echo(f"note: {note}")


def _setup(
    config: Path | None,
    from_bench: Path | None,
    flags: dict[str, Any],
    spec: WorkloadSpec,
    generate: bool,
    seed: int,
) -> tuple[SimConfig, list[ClusterRequest], BenchRun | None]:
    """The config (a bench run's, then --config, then flags) and the workload."""
    from ember.sim.config import load_config
    from ember.sim.from_bench import load_bench
    from ember.sim.run import bench_workload, make_workload

    if from_bench is None:
        cfg = load_config(config, **flags)
        return cfg, make_workload(cfg, spec, seed), None
    run = load_bench(from_bench)
    cfg = load_config(config, run.config, **flags)
    return cfg, bench_workload(run, cfg, spec, generate=generate, seed=seed), run


def _per_policy(
    run: BenchRun,
    names: list[str],
    config: Path | None,
    flags: dict[str, Any],
    workload: list[ClusterRequest],
    seed: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each policy simulated with the physics its own real run measured."""
    from ember.sim.config import load_config
    from ember.sim.from_bench import bench_run
    from ember.sim.run import run_each

    runs = {n: bench_run(run.data, n) if n in run.real else run for n in names}
    for n in names:
        if n not in run.real:
            typer.echo(f"assumed: {n}: not in the real run: the physics pooled over its runs")
    report, outcomes = run_each(
        {n: load_config(config, r.config, **flags) for n, r in runs.items()}, workload, seed=seed
    )
    run.calibration = {"per_policy": {n: r.calibration for n, r in runs.items()}}
    return report, outcomes


def _compare(
    report: dict[str, Any],
    run: BenchRun,
    repeats: list[Path],
    simulate: Callable[[BenchRun], tuple[dict[str, Any], dict[str, Any]]],
    *,
    tolerance: float,
    spread: float,
) -> None:
    """Print and add to `report` the comparison with the real run; with repeats, each
    repeat simulated under its own measurements, real and simulated figures averaged."""
    from ember.sim.compare import combine_runs, compare, render_comparison
    from ember.sim.from_bench import load_bench

    reals, sims = [run.real], [report["policies"]]
    for path in repeats:
        again = load_bench(path)
        if any(again.data.get(k) != run.data.get(k) for k in ("trace", "cluster", "models")):
            raise InvalidRequestError(
                f"{path} is not a repeat of the --from-bench run: its cluster or trace differs",
                param="repeat",
            )
        reals.append(again.real)
        sims.append(simulate(again)[0]["policies"])
    if repeats:
        real, spreads = combine_runs(reals)
        sim, _ = combine_runs(sims)
        result = compare(real, sim, tolerance=tolerance, spread=spread, spreads=spreads)
    else:
        result = compare(run.real, report["policies"], tolerance=tolerance, spread=spread)
    typer.echo("")
    typer.echo(render_comparison(result))
    report["comparison"] = {**result.to_json(), "repeats": [str(p) for p in repeats]}
