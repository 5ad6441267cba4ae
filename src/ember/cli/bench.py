"""`ember bench`: measurements people can read, and JSON for scripts."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ember.cli.base import EmberTyper
from ember.cli.output import JsonOption, console, human_bytes, print_json, print_table, stage_progress
from ember.errors import InvalidRequestError

bench_app = EmberTyper(help="Benchmarks.")


def _register() -> None:
    from ember.cli.bench_cli import cli_command
    from ember.cli.bench_cluster import cluster_command
    from ember.cli.bench_cold import cold_command
    from ember.cli.bench_cost import cost_command
    from ember.cli.bench_engine import engine_command
    from ember.cli.bench_sched import sched_command
    from ember.cli.bench_serve import bench_serve_cmd

    bench_app.command("sched")(sched_command)
    bench_app.command("cost")(cost_command)
    bench_app.command("engine")(engine_command)
    bench_app.command("cold")(cold_command)
    bench_app.command("cluster")(cluster_command)
    bench_app.command("cli")(cli_command)
    bench_app.command("serve")(bench_serve_cmd)


@bench_app.command("load")
def load_cmd(
    target: Annotated[str | None, typer.Argument(help="A checkpoint name or directory.")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Repetitions (medians are reported).")] = 3,
    random_llama: Annotated[
        str | None,
        typer.Option(help="Benchmark a random-weight Llama of about this size instead, e.g. 2GB."),
    ] = None,
    random_dtype: Annotated[
        str, typer.Option(help="dtype of --random-llama: bfloat16 or float32.")
    ] = "bfloat16",
    as_json: bool = JsonOption,
) -> None:
    """Checkpoint load speed, cold and warm, against the disk's raw read limit,
    safetensors and torch.load of the same tensors. Records the faster cold read
    mode for this filesystem (used by the loader's io=auto)."""
    from ember.bench.load import run_load_bench
    from ember.bench.random_llama import make_random_llama, parse_size
    from ember.env import ember_home
    from ember.store.local import LocalStore

    if (target is None) == (random_llama is None):
        raise InvalidRequestError("give a checkpoint (name or directory) or --random-llama SIZE, not both")
    scratch = None
    try:
        if random_llama is not None:
            size = parse_size(random_llama)
            scratch = Path(tempfile.mkdtemp(prefix=".ember-bench-llama-", dir=ember_home()))
            with stage_progress({}, enabled=not as_json) as p:
                p(f"writing a random {human_bytes(size)} Llama ({random_dtype})", 0, 0)
                ckpt = make_random_llama(scratch / "random-llama", size, dtype=random_dtype)
        else:
            ckpt = LocalStore().resolve(str(target))
        with stage_progress({}, enabled=not as_json) as p:
            report = run_load_bench(ckpt, repeats=repeats, progress=lambda d, t: p("measuring", d, t))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    if as_json:
        print_json(report.to_json())
        return
    tensor_size = human_bytes(report.tensor_bytes)
    print_table(
        f"load: {report.checkpoint} ({tensor_size} of tensors, {report.repeats} repeats)",
        ["method", "cache", "median s", "GB/s"],
        [[r.method, r.cache, f"{r.median_s:.4f}", f"{r.gbps:.2f}"] for r in report.results],
    )
    print_table(
        "targets",
        ["target line", "value", "goal", "status"],
        [
            [t.name, f"{t.ratio:.2f}", f">= {t.target:.2f}", "met" if t.met else "NOT MET"]
            for t in report.targets
        ],
    )
    out = console()
    out.print(f"cold read mode recorded for this filesystem: {report.ember_cold_mode}")
    out.print(f"DRAM pool hit measured with: {report.dram_pool}")
    for note in report.notes:
        out.print(f"note: {note}")


_register()
