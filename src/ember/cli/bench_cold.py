"""`ember bench cold`: cold-start overhead over HTTP by tier (DRAM, disk, registry),
against a serving process that loads with transformers.

Registered on the `bench` typer app: `bench_app.command("cold")(cold_command)`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ember.cli.output import check_number, console, human_bytes, print_table, stage_progress
from ember.errors import InvalidRequestError

if TYPE_CHECKING:  # the benchmark imports torch and the server: only when it runs
    from ember.bench.cold import BenchModel, ColdReport

SMOLLM2 = "smollm2"
RANDOM_LLAMA = "random-llama"


def _models(names: list[str], scratch: Path, random_size: str) -> list[BenchModel]:
    """Checkpoints for the names: smollm2 (imported into the store if missing), a
    random-weight Llama with SmolLM2's tokenizer, or a store name / directory."""
    from ember.bench.cluster_models import SMOLLM2_VOCAB, smollm2_tokenizer_files
    from ember.bench.cold import BenchModel
    from ember.bench.random_llama import make_random_llama, parse_size
    from ember.store.importer import ensure_default_model
    from ember.store.local import LocalStore

    store = LocalStore()
    out = []
    for name in names:
        if name == SMOLLM2:
            out.append(BenchModel(SMOLLM2, store.resolve(ensure_default_model(store))))
        elif name == RANDOM_LLAMA:
            ckpt = make_random_llama(
                scratch / RANDOM_LLAMA, parse_size(random_size), vocab=SMOLLM2_VOCAB,
                files=smollm2_tokenizer_files(),
            )  # fmt: skip
            out.append(BenchModel(RANDOM_LLAMA, ckpt))
        else:
            path = store.resolve(name)
            out.append(BenchModel(path.name, path))
    return out


def cold_command(
    models: Annotated[
        str, typer.Option(help=f"Comma-separated: {SMOLLM2}, {RANDOM_LLAMA}, or store names / directories.")
    ] = f"{SMOLLM2},{RANDOM_LLAMA}",
    repeats: Annotated[int, typer.Option(min=1, help="Repetitions (medians are reported).")] = 3,
    random_size: Annotated[str, typer.Option(help=f"Size of {RANDOM_LLAMA} (bfloat16).")] = "1.2GB",
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens each request generates.")] = 8,
    keep_alive: Annotated[
        float, typer.Option(help="Keep-alive of the deployments, s: how soon they scale to zero.")
    ] = 1.0,
    registry_gbps: Annotated[
        float | None,
        typer.Option(
            help="Put the registry behind a link of this many Gb/s (default: loopback's speed); "
            "the raw download is then not measured."
        ),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
) -> None:
    """Cold-start overhead of Ember over HTTP (TTFT from zero instances minus warm TTFT)
    with the weights in the node's DRAM pool, on its disk (page cache dropped) or in a
    registry over loopback HTTP, side by side with transformers' from_pretrained from
    safetensors in the running process."""
    from ember.bench.cold import ColdBenchConfig, run_cold_bench
    from ember.env import ember_home

    names = [n.strip() for n in models.split(",") if n.strip()]
    if not names:
        raise InvalidRequestError("give at least one model", param="models")
    if registry_gbps is not None:
        check_number("--registry-gbps", registry_gbps)
    link_bps = registry_gbps * 1e9 / 8 if registry_gbps is not None else None
    cfg = ColdBenchConfig(
        repeats=repeats, max_tokens=max_tokens, keep_alive_s=keep_alive, registry_link_bps=link_bps
    )
    scratch = Path(tempfile.mkdtemp(prefix=".ember-bench-cold-", dir=ember_home()))
    try:
        with stage_progress({}) as p:
            p("preparing the models", 0, 0)
            bench_models = _models(names, scratch, random_size)
            report = run_cold_bench(bench_models, scratch / "work", cfg, progress=p)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _print(report)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)  # e.g. results/, ignored by git
        json_path.write_text(json.dumps(report.to_json(), indent=2))


def _print(report: ColdReport) -> None:
    data = report.to_json()
    rows = []
    for m in data["models"]:
        base = next(r for r in m["rows"] if r["tier"] == "transformers")["overhead_s"]
        for r in m["rows"]:
            ratio = f"{r['overhead_s'] / base:.3f}" if base > 0 else "-"
            rows.append([m["model"], r["tier"], f"{r['cold_ttft_s']:.3f}", f"{r['warm_ttft_s']:.3f}",
                         f"{r['overhead_s']:.3f}", f"{r['load_s']:.3f}", ratio])  # fmt: skip
    sizes = ", ".join(f"{m['model']} {human_bytes(m['nbytes'])} {m['dtype']}" for m in data["models"])
    print_table(
        f"cold start over HTTP: {sizes}; medians of {report.config.repeats}, "
        f"{report.config.max_tokens}-token streaming chat completions (seconds)",
        ["model", "from", "cold TTFT", "warm TTFT", "overhead", "load", "/ baseline"],
        rows,
    )
    wire = [
        [m["model"], w["server"], w["method"], f"{w['median_s']:.3f}", f"{w['gbps']:.2f}"]
        for m in data["models"]
        for w in m["wire"]
    ]
    if wire:
        print_table(
            "the registry's download over loopback HTTP: raw limit (plain ranged GETs into touched "
            "memory) and Ember's (need order, every chunk checksummed)",
            ["model", "server", "method", "seconds", "GB/s"],
            wire,
        )
    print_table(
        "targets",
        ["target line", "value", "goal", "status"],
        [
            [
                t.name,
                f"{t.ratio:.3f}",
                f"{'>=' if t.at_least else '<='} {t.goal:.3f}",
                "met" if t.met else "NOT MET",
            ]
            for t in report.targets()
        ],
    )
    out = console()
    out.print(
        "overhead = cold TTFT - warm TTFT; load s = instance start-up (Ember) or "
        "tokenizer + from_pretrained (transformers, whose cold TTFT adds its first token)"
    )
    for note in report.notes:
        out.print(f"note: {note}")
