"""`ember bench sched`: FCFS, skip-join MLFQ and SRPT replayed on a request trace.

Registered on the `bench` typer app: `bench_app.command("sched")(sched_command)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ember.errors import InvalidRequestError


def _rate(value: str) -> float | None:
    if value == "auto":
        return None
    try:
        rate = float(value)
    except ValueError as e:
        raise InvalidRequestError(
            f"--rate-scale is a number or 'auto', got {value!r}", param="rate_scale"
        ) from e
    if rate <= 0:
        raise InvalidRequestError("--rate-scale must be positive", param="rate_scale")
    return rate


def sched_command(
    model: Annotated[str, typer.Option(help="A checkpoint name or directory.")],
    trace: Annotated[Path, typer.Option(help="CSV: arrived_at,num_prefill_tokens,num_decode_tokens.")],
    num_requests: Annotated[int, typer.Option(min=1, help="Replay the first N requests.")] = 100,
    length_scale: Annotated[float, typer.Option(help="Multiply prompt and output lengths by this.")] = 0.1,
    rate_scale: Annotated[
        str, typer.Option(help="Multiply the arrival rate by this, or 'auto' (--load x FCFS capacity).")
    ] = "auto",
    load: Annotated[float, typer.Option(help="With --rate-scale auto: fraction of FCFS's capacity.")] = 0.85,
    policies: Annotated[str, typer.Option(help="Comma-separated: fcfs, mlfq, srpt.")] = "fcfs,mlfq,srpt",
    swap: Annotated[
        str | None, typer.Option(help="proactive, reactive or off (default: the engine's).")
    ] = None,
    kv_budget: Annotated[int | None, typer.Option(help="KV cache bytes (default: the engine's).")] = None,
    swap_bytes: Annotated[
        int | None, typer.Option(help="Host swap space bytes (default: the engine's: the KV budget).")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the CDF of completion time (PNG) here.")] = None,
) -> None:
    """Replay a trace against the engine under each scheduling policy, with identical
    engine settings, and compare completion time, TTFT, TPOT and preemption counters."""
    from ember.bench.sched import SchedBenchConfig, plot_jct_cdf, run_sched_bench

    names = tuple(p.strip() for p in policies.split(",") if p.strip())
    if not names:
        raise InvalidRequestError("give at least one policy", param="policies")
    cfg = SchedBenchConfig(
        model=model,
        trace=str(trace),
        num_requests=num_requests,
        length_scale=length_scale,
        rate_scale=_rate(rate_scale),
        load=load,
        policies=names,
        swap=swap,
        kv_budget=kv_budget,
        swap_bytes=swap_bytes,
    )
    report = run_sched_bench(cfg)
    jcts = report.pop("_jcts")
    _print(report)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)  # e.g. results/, ignored by git
        json_path.write_text(json.dumps(report, indent=2, default=str))
    if plot is not None:
        w = report["workload"]
        title = (
            f"{Path(str(trace)).name}: {w['requests']} requests, lengths x{w['length_scale']}, "
            f"{w['rate_req_s']:.2f} req/s"
        )
        plot_jct_cdf(jcts, plot, title)


def _print(report: dict[str, object]) -> None:
    from ember.cli.output import print_table

    w = report["workload"]
    assert isinstance(w, dict)
    capacity = w["measured_capacity_req_s"]
    cap = f", FCFS capacity {capacity:.2f} req/s" if capacity else ""
    title = (
        f"{Path(str(w['trace'])).name}: {w['requests']} requests, lengths x{w['length_scale']} "
        f"(mean prompt {w['mean_prompt_tokens']:.0f}, output {w['mean_output_tokens']:.0f}), "
        f"rate x{w['rate_scale']:.3g} = {w['rate_req_s']:.2f} req/s{cap}"
    )
    columns = [
        ("policy", None),
        ("JCT mean/p50/p99 s", ("mean_jct_s", "p50_jct_s", "p99_jct_s")),
        ("TTFT mean/p50/p99 s", ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s")),
        ("TPOT mean/p50/p99 ms", ("mean_tpot_s", "p50_tpot_s", "p99_tpot_s")),
        ("s/token", ("mean_norm_latency_s",)),
        ("tok/s", ("throughput_tok_s",)),
        ("preempt", ("preemptions",)),
        ("swap out/in", ("swaps_out", "swaps_in")),
        ("recompute", ("recomputations",)),
    ]
    policies = report["policies"]
    assert isinstance(policies, dict)
    rows = []
    for policy, r in policies.items():
        cells = [policy]
        for name, keys in columns[1:]:
            assert keys is not None
            scale = 1000 if "ms" in name else 1
            cells.append(
                "/".join(f"{r[k] * scale:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys)
            )
        rows.append(cells)
    names = [name for name, _ in columns]
    print_table(title, names, rows, right={n.lower() for n in names[1:]})
