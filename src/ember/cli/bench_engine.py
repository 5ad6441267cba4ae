"""`ember bench engine`: engine throughput against transformers, the bandwidth floor,
resident memory, start-up from a DRAM-pool hit."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ember.cli.output import JsonOption, console, human_bytes, print_json, print_table


def engine_command(
    model: Annotated[
        str | None, typer.Argument(help="Store name (default: SmolLM2, imported if missing).")
    ] = None,
    batches: Annotated[str, typer.Option(help="Decode batch sizes, comma-separated.")] = "1,8,32",
    prompt_len: Annotated[int, typer.Option(min=1, help="Prefill length, tokens.")] = 512,
    rounds: Annotated[int, typer.Option(min=1, help="Repetitions (medians are reported).")] = 3,
    background_load: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Also time decode at batch 1 and 8 beside N busy processes, Ember's thread "
            "settings against torch's defaults (each in its own process).",
        ),
    ] = None,
    as_json: bool = JsonOption,
) -> None:
    """Prefill and decode tokens/s at several batch sizes, side by side with transformers'
    forward on the same weights and dtype; the batch-1 decode step against the
    memory-bandwidth floor; resident memory; start-up time from a DRAM-pool hit. With
    --background-load N, decode tokens/s beside N busy processes: Ember's thread count and
    wait policy against torch's defaults, interleaved, medians."""
    from ember.bench.engine import run_engine_bench
    from ember.store.importer import ensure_default_model
    from ember.store.local import LocalStore

    store = LocalStore()
    name = model or ensure_default_model(store)
    sizes = tuple(int(b) for b in batches.split(",") if b.strip())
    report = run_engine_bench(
        name, store.resolve(name), batches=sizes, prompt_len=prompt_len, rounds=rounds,
        background_load=background_load,
    )  # fmt: skip
    if as_json:
        print_json(report.to_json())
        return
    rows = [
        (r["case"], f"{r['ours_tok_s']:.1f}", f"{r['hf_tok_s']:.1f}", f"{r['speedup']:.2f}x")
        for r in report.rows
    ]
    print_table(f"ember bench engine: {name} ({report.dtype}, {report.threads} threads)",
                ["case", "ours tok/s", "transformers tok/s", "ours / transformers"], rows)  # fmt: skip
    c = console()
    c.print(
        f"batch-1 decode step {report.decode_b1_step_s * 1e3:.1f} ms; bandwidth floor "
        f"{report.floor_step_s * 1e3:.1f} ms ({human_bytes(report.weight_bytes)} at "
        f"{report.bandwidth_gbps:.1f} GB/s): {report.floor_ratio:.2f}x"
    )
    c.print(
        f"resident {human_bytes(report.rss_bytes)}; limit {human_bytes(report.rss_limit_bytes)} "
        f"(weights + KV budget {human_bytes(report.kv_budget_bytes)} + 300 MB)"
    )
    c.print(f"start-up from a DRAM-pool hit: {report.startup_from_dram_s * 1e3:.1f} ms (median)")
    for t in report.targets():
        c.print(f"  [{'green' if t['met'] else 'red'}]{'met' if t['met'] else 'NOT met'}[/] {t['name']}: "
                f"{t['ratio']:.2f} (target {t['target']})")  # fmt: skip
    if report.load_rows:
        _print_load_rows(report.load_rows)


def _print_load_rows(load_rows: list[dict[str, Any]]) -> None:
    first = load_rows[0]
    rows = [
        (r["case"], f"{r['ember_tok_s']:.1f}", f"{r['torch_tok_s']:.1f}", f"{r['speedup']:.2f}x")
        for r in load_rows
    ]
    ours = f"{first['ember_threads']} threads, {first['ember_wait']}"
    theirs = f"{first['torch_threads']} threads, {first['torch_wait']}"
    print_table(
        f"beside {first['background_load']} busy processes: ember ({ours}) against torch default ({theirs})",
        ["case", "ember tok/s", "torch default tok/s", "ember / torch default"],
        rows,
    )
