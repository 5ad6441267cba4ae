"""`ember bench engine`: engine throughput against transformers, the bandwidth floor,
resident memory, start-up from a DRAM-pool hit."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ember.cli.output import JsonOption, console, human_bytes, print_json, print_table
from ember.errors import InvalidRequestError


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
    e2e_batches: Annotated[
        str,
        typer.Option(help='End-to-end generate batch sizes, comma-separated ("" to skip).'),
    ] = "1,16,32",
    e2e_prompt_len: Annotated[int, typer.Option(min=1, help="End-to-end prompt length, tokens.")] = 64,
    e2e_new_tokens: Annotated[int, typer.Option(min=1, help="End-to-end new tokens per prompt.")] = 64,
    as_json: bool = JsonOption,
) -> None:
    """Prefill and decode tokens/s at several batch sizes, side by side with transformers'
    forward on the same weights and dtype; the batch-1 decode step against the
    memory-bandwidth floor; resident memory; start-up time from a DRAM-pool hit.

    End to end, LLM.generate against transformers' generate (each in its own process,
    greedy, EOS ignored) and the parts of Ember's iterations outside the model forward.

    With --background-load N, decode tokens/s beside N busy processes: Ember's thread
    count and wait policy against torch's defaults, interleaved, medians."""
    sizes, e2e_sizes = _sizes(batches, "--batches"), _sizes(e2e_batches, "--e2e-batches")
    from ember.bench.engine import run_engine_bench
    from ember.store.importer import ensure_default_model
    from ember.store.local import LocalStore

    store = LocalStore()
    name = model or ensure_default_model(store)
    report = run_engine_bench(
        name, store.resolve(name), batches=sizes, prompt_len=prompt_len,
        rounds=rounds, background_load=background_load, e2e_batches=e2e_sizes,
        e2e_prompt_len=e2e_prompt_len, e2e_new_tokens=e2e_new_tokens,
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
        + (" (no target on a CPU)" if report.device == "cpu" else "")
    )
    if report.e2e_rows:
        _print_e2e_rows(report.e2e_rows)
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


def _sizes(text: str, flag: str) -> tuple[int, ...]:
    """Comma-separated positive batch sizes; a clear error for anything else."""
    try:
        sizes = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        sizes = (0,)
    if any(b < 1 for b in sizes):
        raise InvalidRequestError(f"{flag}: expected positive integers separated by commas, got {text!r}")
    return sizes


def _print_e2e_rows(e2e_rows: list[dict[str, Any]]) -> None:
    first = e2e_rows[0]
    rows = [
        (r["case"], f"{r['ours_tok_s']:.1f}", f"{r['hf_tok_s']:.1f}", f"{r['speedup']:.2f}x")
        for r in e2e_rows
    ]
    print_table(
        f"end to end: {first['prompt_len']} prompt + {first['new_tokens']} new tokens, greedy; "
        f"ember ({first['ember_threads']} threads, {first['ember_wait']}) against transformers "
        f"({first['hf_threads']} threads, {first['hf_wait']})",
        ["case", "LLM.generate tok/s", "transformers generate tok/s", "ours / transformers"],
        rows,
    )
    parts = list(e2e_rows[0]["step_parts"]["shares"])
    print_table(
        "share of Ember's iteration time by part (its median run)",
        ["case", "iteration ms", *parts, "outside forward"],
        [
            (r["case"], f"{r['step_parts']['step_s'] / max(r['step_parts']['iterations'], 1) * 1e3:.1f}",
             *(f"{r['step_parts']['shares'][p]:.1%}" for p in parts),
             f"{r['step_parts']['outside_forward_share']:.1%}")
            for r in e2e_rows
        ],
    )  # fmt: skip


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
