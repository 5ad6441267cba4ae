"""`ember bench cluster`: placement policies on a real multi-model workload, over the
real server, controller and embedded nodes (bench/cluster.py).

Registered on the `bench` typer app: `bench_app.command("cluster")(cluster_command)`.
Every flag is checked here, before anything loads (InvalidRequestError).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ember.cli.output import check_number
from ember.errors import InvalidRequestError

if TYPE_CHECKING:  # the benchmark imports torch and the server: only when it runs
    from ember.bench.cluster import ClusterReport
    from ember.bench.cluster_models import ClusterModel
    from ember.bench.cluster_workload import ClusterRequest

DEFAULT_POLICIES = "startup-time-aware,random,round-robin,remote-only,startup-time-aware-no-migration"
# Each instance's engine: a small KV cache (instances share one machine's memory); 64 MiB
# holds MAX_MODEL_LEN tokens of any 0.15-0.3 GB random model (at most 10 layers, 15 KB a token).
MAX_MODEL_LEN = 1024
ENGINE = {"kv_cache_bytes": 64 << 20, "max_model_len": MAX_MODEL_LEN, "max_num_seqs": 8}


def parse_policies(text: str) -> tuple[str, ...]:
    from ember.bench.cluster_server import BENCH_POLICIES

    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in BENCH_POLICIES]
    if not names or unknown or len(set(names)) != len(names):
        raise InvalidRequestError(
            f"--policies takes distinct names among {', '.join(BENCH_POLICIES)}; got {text!r}",
            param="policies",
        )
    return names


def parse_sizes(text: str) -> list[int]:
    from ember.bench.random_llama import parse_size

    sizes = [parse_size(s) for s in text.split(",") if s.strip()]
    if not sizes:
        raise InvalidRequestError("--sizes takes sizes like 0.2GB,0.5GB", param="sizes")
    return sizes


def _models(models: str | None, random_models: int | None, sizes: str, home: Path) -> list[ClusterModel]:
    from ember.bench.cluster_models import random_models as make_random
    from ember.bench.cluster_models import store_models

    if (models is None) == (random_models is None):
        raise InvalidRequestError("give --models NAME,... or --random-models K, not both", param="models")
    if models is not None:
        names = [n.strip() for n in models.split(",") if n.strip()]
        if not names:
            raise InvalidRequestError("--models names no model", param="models")
        return store_models(names)
    assert random_models is not None
    return make_random(home / "bench-cluster" / "models", random_models, parse_sizes(sizes))


def _workload(
    trace: Path | None, names: list[str], opts: dict[str, float | int | str]
) -> list[ClusterRequest]:
    from ember.bench.cluster_workload import generate_cluster_workload, read_cluster_trace

    if trace is not None:
        return read_cluster_trace(trace, num_requests=int(opts["requests"]))
    return generate_cluster_workload(
        names, requests=int(opts["requests"]), rate=float(opts["rate"]), zipf=float(opts["zipf"]),
        seed=int(opts["seed"]), arrivals=str(opts["arrivals"]), prompt_scale=float(opts["prompt_scale"]),
        output_scale=float(opts["output_scale"]),
    )  # fmt: skip


def cluster_command(
    models: Annotated[str | None, typer.Option(help="Comma-separated store names or directories.")] = None,
    random_models: Annotated[
        int | None,
        typer.Option(min=1, help="Serve K random-weight Llamas (float32, real shapes) instead, made once."),
    ] = None,
    sizes: Annotated[
        str, typer.Option(help="Sizes of the random models, assigned in turn, e.g. 0.2GB,0.5GB,1GB.")
    ] = "0.2GB",
    nodes: Annotated[int, typer.Option(min=1, help="Embedded nodes.")] = 4,
    slots: Annotated[int, typer.Option(min=1, help="Instances each node runs at once.")] = 1,
    dram_bytes: Annotated[int, typer.Option(min=1, help="Each node's DRAM pool, bytes.")] = 1 << 30,
    disk_bytes: Annotated[int, typer.Option(min=1, help="Each node's disk cache, bytes.")] = 2 << 30,
    keep_alive: Annotated[float, typer.Option(help="Keep-alive of every deployment, s.")] = 10.0,
    registry_gbps: Annotated[
        float | None,
        typer.Option(help="Put the registry behind a link of this many Gb/s (default: loopback's speed)."),
    ] = None,
    policies: Annotated[str, typer.Option(help="Placement policies, run one after another.")] = (
        DEFAULT_POLICIES
    ),
    trace: Annotated[
        Path | None,
        typer.Option(help="CSV: arrived_at,model,num_prefill_tokens,num_decode_tokens (else generated)."),
    ] = None,
    requests: Annotated[
        int, typer.Option(min=1, help="Requests per policy (generated, or a trace's first).")
    ] = 200,
    rate: Annotated[float, typer.Option(help="Requests per second (generated).")] = 0.5,
    zipf: Annotated[float, typer.Option(help="Zipf exponent of model popularity (generated).")] = 1.1,
    arrivals: Annotated[
        str, typer.Option(help="azure, poisson or gamma:<burstiness> (generated).")
    ] = "azure",
    prompt_scale: Annotated[float, typer.Option(help="Scale of the trace's prompt lengths.")] = 0.25,
    output_scale: Annotated[float, typer.Option(help="Scale of the trace's output lengths.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the workload and the prompts.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the TTFT CDF per policy (PNG) here.")] = None,
) -> None:
    """Placement policies side by side on one multi-model workload: the real HTTP server,
    controller and --nodes embedded nodes with bounded DRAM pools and disk caches, a
    registry over loopback HTTP, every model a deployment scaled to zero; requests
    streamed through the openai client. TTFT, E2E, starts by tier, migrations."""
    from ember.bench.cluster import ClusterBenchConfig, run_cluster_bench
    from ember.bench.cluster_server import ClusterShape
    from ember.cli.output import stage_progress
    from ember.env import ember_home

    names = parse_policies(policies)
    for flag, value in (("--rate", rate), ("--zipf", zipf), ("--prompt-scale", prompt_scale),
                        ("--output-scale", output_scale)):  # fmt: skip
        check_number(flag, value)
    check_number("--keep-alive", keep_alive, positive=False)
    if registry_gbps is not None:
        check_number("--registry-gbps", registry_gbps)
    home = ember_home()
    shape = ClusterShape(nodes, slots, dram_bytes, disk_bytes, keep_alive, engine_options=ENGINE)
    opts: dict[str, float | int | str] = {
        "requests": requests, "rate": rate, "zipf": zipf, "seed": seed, "arrivals": arrivals,
        "prompt_scale": prompt_scale, "output_scale": output_scale,
    }  # fmt: skip
    made = {"trace": str(trace), "requests": requests} if trace is not None else opts
    link_bps = registry_gbps * 1e9 / 8 if registry_gbps is not None else None
    cfg = ClusterBenchConfig(
        names, shape, seed=seed, max_model_len=MAX_MODEL_LEN, workload=dict(made), registry_bps=link_bps
    )
    with stage_progress({}) as p:
        p("preparing the models", 0, 0)
        bench_models = _models(models, random_models, sizes, home)
        workload = _workload(trace, [m.name for m in bench_models], opts)
        report = run_cluster_bench(bench_models, workload, home / "bench-cluster" / "work", cfg, progress=p)
    _output(report, json_path, plot)


def _output(report: ClusterReport, json_path: Path | None, plot: Path | None) -> None:
    from ember.bench.cluster_report import plot_ttft_cdf, render_table
    from ember.cli.output import console

    data = report.to_json()
    console().print(render_table(data))
    for note in report.notes:
        console().print(f"note: {note}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=2))
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        plot_ttft_cdf(report.outcomes(), plot)
