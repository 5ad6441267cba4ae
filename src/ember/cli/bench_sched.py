"""`ember bench sched`: scheduling policies replayed on a request trace, at one load
or along a latency-against-load curve.

Registered on the `bench` typer app: `bench_app.command("sched")(sched_command)`.
The flags are parsed into a SchedBenchConfig here (every error a clear
InvalidRequestError); the tables are printed by cli/bench_sched_output.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from ember.errors import InvalidRequestError

DEFAULT_SCALE = 0.1


def _auto_or_number(value: str, flag: str, *, allow_inf: bool = False) -> float | None:
    """'auto' -> None, else a positive number (inf only where `allow_inf`)."""
    if value == "auto":
        return None
    try:
        x = float(value)
    except ValueError as e:
        raise InvalidRequestError(f"{flag} is a number or 'auto', got {value!r}", param=flag[2:]) from e
    if not x > 0 or (math.isinf(x) and not allow_inf) or math.isnan(x):
        raise InvalidRequestError(
            f"{flag} must be a positive number or 'auto', got {value!r}", param=flag[2:]
        )
    return x


def _scales(length: float | None, prompt: float | None, output: float | None) -> tuple[float, float]:
    """(prompt scale, output scale): --length-scale sets both, and comes alone."""
    if length is not None and (prompt is not None or output is not None):
        raise InvalidRequestError(
            "--length-scale sets both lengths: give it, or --prompt-scale / --output-scale, not both",
            param="length_scale",
        )
    for flag, x in (("--length-scale", length), ("--prompt-scale", prompt), ("--output-scale", output)):
        if x is not None and not (x > 0 and math.isfinite(x)):
            raise InvalidRequestError(f"{flag} must be positive, got {x}", param=flag[2:])
    both = DEFAULT_SCALE if length is None else length
    return (both if prompt is None else prompt), (both if output is None else output)


def parse_loads(text: str) -> tuple[float, ...]:
    """--loads: comma-separated fractions of FCFS's capacity, each in (0, 1.5], distinct."""
    from ember.bench.sched import MAX_LOAD

    loads = []
    for part in (p.strip() for p in text.split(",")):
        try:
            x = float(part)
        except ValueError as e:
            raise InvalidRequestError(
                f"--loads takes numbers like 0.1,0.5,0.9, got {part!r}", param="loads"
            ) from e
        if not 0 < x <= MAX_LOAD:
            raise InvalidRequestError(
                f"--loads: each load must be in (0, {MAX_LOAD}], got {part}", param="loads"
            )
        loads.append(x)
    if len(set(loads)) != len(loads):
        raise InvalidRequestError(f"--loads names a load twice: {text}", param="loads")
    return tuple(loads)


def parse_swaps(text: str | None) -> tuple[str | None, ...]:
    """--swap: one mode or several, comma-separated (None: the engine's default)."""
    if text is None:
        return (None,)
    return tuple(p.strip() for p in text.split(",") if p.strip()) or (None,)


def sched_command(
    model: Annotated[str, typer.Option(help="A checkpoint name or directory.")],
    trace: Annotated[Path, typer.Option(help="CSV: arrived_at,num_prefill_tokens,num_decode_tokens.")],
    num_requests: Annotated[int, typer.Option(min=1, help="Replay the first N requests.")] = 100,
    length_scale: Annotated[
        float | None, typer.Option(help="Multiply prompt and output lengths by this (default 0.1).")
    ] = None,
    prompt_scale: Annotated[float | None, typer.Option(help="Multiply prompt lengths by this.")] = None,
    output_scale: Annotated[float | None, typer.Option(help="Multiply output lengths by this.")] = None,
    rate_scale: Annotated[
        str,
        typer.Option(help="Trace arrivals: multiply their rate by this, or 'auto' (--load x FCFS capacity)."),
    ] = "auto",
    request_rate: Annotated[
        str | None,
        typer.Option(
            help="Generate gamma arrivals at this rate (req/s, inf) or 'auto' (--load x FCFS capacity)."
        ),
    ] = None,
    burstiness: Annotated[
        float | None, typer.Option(help="With --request-rate: gamma shape (1 = Poisson; lower: burstier).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the generated arrivals.")] = 0,
    load: Annotated[
        float | None,
        typer.Option(
            help="Fraction of FCFS's capacity for the policy table (default 0.85; the top of --loads)."
        ),
    ] = None,
    loads: Annotated[
        str | None,
        typer.Option(help="Comma-separated loads: every policy at each, the curve and the SLO rate."),
    ] = None,
    repeats: Annotated[
        int, typer.Option(min=1, help="Runs of each case, interleaved; medians reported.")
    ] = 1,
    slo_x: Annotated[
        float, typer.Option(help="SLO: this times FCFS's mean JCT at the lowest of --loads.")
    ] = 5.0,
    policies: Annotated[
        str,
        typer.Option(help="Comma-separated: fcfs, mlfq, srpt, default; NAME@N at max_num_batched_tokens N."),
    ] = "fcfs,mlfq,srpt",
    swap: Annotated[
        str | None,
        typer.Option(help="proactive, reactive, off, or several comma-separated (default: the engine's)."),
    ] = None,
    max_num_seqs: Annotated[
        int | None, typer.Option(min=1, help="Sequences in one batch (default: the engine's, 32).")
    ] = None,
    kv_budget: Annotated[int | None, typer.Option(help="KV cache bytes (default: the engine's).")] = None,
    swap_bytes: Annotated[
        int | None, typer.Option(help="Host swap space bytes (default: the engine's: the KV budget).")
    ] = None,
    cost_model: Annotated[
        Path | None,
        typer.Option(
            help="Replay on this cost model's clock (ember bench cost): deterministic, no forward; "
            "default: the real engine in real time."
        ),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the CDF of completion time (PNG) here.")] = None,
    curve_plot: Annotated[
        Path | None, typer.Option(help="With --loads: write mean JCT against request rate (PNG) here.")
    ] = None,
) -> None:
    """Replay a trace against the engine under each scheduling policy, with identical
    engine settings, and compare completion time, TTFT, TPOT, iteration time and
    preemption counters; with --loads, along a latency-against-load curve."""
    from ember.bench.sched import SchedBenchConfig, run_sched_bench
    from ember.bench.sched_cases import parse_policies
    from ember.cli.bench_sched_output import print_report, write_plots
    from ember.cli.output import err_console, stage_progress

    prompt, output = _scales(length_scale, prompt_scale, output_scale)
    if request_rate is not None and rate_scale != "auto":
        raise InvalidRequestError(
            "--rate-scale scales the trace's arrivals, --request-rate generates them: give one",
            param="request_rate",
        )
    if burstiness is not None and request_rate is None:
        raise InvalidRequestError(
            "--burstiness shapes generated arrivals: give --request-rate too", param="burstiness"
        )
    grid = parse_loads(loads) if loads is not None else ()
    if curve_plot is not None and not grid:
        raise InvalidRequestError("--curve-plot draws the --loads curve: give --loads", param="curve_plot")
    cfg = SchedBenchConfig(
        model=model,
        trace=str(trace),
        num_requests=num_requests,
        prompt_scale=prompt,
        output_scale=output,
        arrivals="trace" if request_rate is None else "gamma",
        rate_scale=_auto_or_number(rate_scale, "--rate-scale"),
        request_rate=None
        if request_rate is None
        else _auto_or_number(request_rate, "--request-rate", allow_inf=True),
        burstiness=1.0 if burstiness is None else burstiness,
        seed=seed,
        load=load,
        loads=grid,
        repeats=repeats,
        slo_x=slo_x,
        policies=parse_policies(policies),
        swaps=parse_swaps(swap),
        max_num_seqs=max_num_seqs,
        kv_budget=kv_budget,
        swap_bytes=swap_bytes,
        cost_model=None if cost_model is None else str(cost_model),
    )
    if err_console().is_terminal:
        with stage_progress({}) as progress:
            report = run_sched_bench(cfg, progress=progress)
    else:  # a log (nohup, CI): one line per case, for runs that take an hour
        report = run_sched_bench(
            cfg, progress=lambda what, done, total: typer.echo(f"[{done}/{total}] {what}", err=True)
        )
    jcts = report.pop("_jcts")
    print_report(report)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)  # e.g. results/, ignored by git
        json_path.write_text(json.dumps(report, indent=2, default=str))
    write_plots(report, jcts, plot, curve_plot)
