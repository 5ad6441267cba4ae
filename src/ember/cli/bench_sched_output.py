"""The tables and plots of `ember bench sched` (cli/bench_sched.py), from its JSON report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ember.cli.output import print_table

# (column, JSON keys, unit scale): figures joined with "/" in one cell
POLICY_COLUMNS: list[tuple[str, tuple[str, ...], float]] = [
    ("JCT mean/p50/p99 s", ("mean_jct_s", "p50_jct_s", "p99_jct_s"), 1),
    ("TTFT mean/p50/p99 s", ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s"), 1),
    ("TPOT mean/p50/p99 ms", ("mean_tpot_s", "p50_tpot_s", "p99_tpot_s"), 1000),
    ("iteration p50/p90/p99 ms", ("p50_iteration_s", "p90_iteration_s", "p99_iteration_s"), 1000),
    ("s/token", ("mean_norm_latency_s",), 1),
    ("tok/s", ("throughput_tok_s",), 1),
    ("preempt", ("preemptions",), 1),
    ("swap out/in", ("swaps_out", "swaps_in"), 1),
    ("recompute", ("recomputations",), 1),
]
CURVE_COLUMNS: list[tuple[str, tuple[str, ...], float]] = [
    ("JCT mean/p50/p99 s", ("mean_jct_s", "p50_jct_s", "p99_jct_s"), 1),
    ("TTFT mean/p50/p99 s", ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s"), 1),
    ("iteration p50/p99 ms", ("p50_iteration_s", "p99_iteration_s"), 1000),
    ("preempt", ("preemptions",), 1),
]


def _cells(r: Mapping[str, Any], columns: Sequence[tuple[str, tuple[str, ...], float]]) -> list[str]:
    return [
        "/".join(f"{r[k] * scale:.2f}" if isinstance(r[k], float) else str(r[k]) for k in keys)
        for _, keys, scale in columns
    ]


def _table(title: str, first: list[str], rows: list[list[str]], columns: Sequence[Any]) -> None:
    names = first + [name for name, _, _ in columns]
    print_table(title, names, rows, right={n.lower() for n in names[len(first) :]})


def title(w: Mapping[str, Any]) -> str:
    """The workload in one line."""
    capacity = w["measured_capacity_req_s"]
    cap = f", FCFS capacity {capacity:.2f} req/s" if capacity else ""
    if w["arrivals"] == "gamma":
        arrivals = f"gamma arrivals (burstiness {w['burstiness']:g}, seed {w['seed']})"
    else:
        arrivals = f"trace arrivals x{w['rate_scale']:.3g}" if w["rate_scale"] else "trace arrivals"
    load = f" (load {w['load']:g})" if w["load"] is not None else ""
    return (
        f"{Path(str(w['trace'])).name}: {w['requests']} requests, prompts x{w['prompt_scale']:g} "
        f"(mean {w['mean_prompt_tokens']:.0f}), outputs x{w['output_scale']:g} "
        f"(mean {w['mean_output_tokens']:.0f}), {arrivals}, {w['rate_req_s']:.2f} req/s{load}{cap}"
    )


def print_report(report: Mapping[str, Any]) -> None:
    """The policy table at the --load point; with --loads, the curve and the SLO rates."""
    w = report["workload"]
    rows = [[p, *_cells(r, POLICY_COLUMNS)] for p, r in report["policies"].items()]
    runs = f", median of {w['repeats']} runs" if w["repeats"] > 1 else ""
    _table(title(w) + runs, ["policy"], rows, POLICY_COLUMNS)
    if "curve" not in report:
        return
    rows = [
        [p, f"{pt['load']:g}", f"{pt['rate_req_s']:.2f}", *_cells(pt, CURVE_COLUMNS)]
        for p, pts in report["curve"].items()
        for pt in pts
    ]
    _table("latency against load", ["policy", "load", "req/s"], rows, CURVE_COLUMNS)
    slo = report["slo"]
    rates = report["max_rate_within_slo"]
    ref = rates.get(slo["reference"])
    rows = []
    for p, rate in rates.items():
        ratio = f"{rate / ref:.2f}" if rate is not None and ref else "-"
        shown = "-" if rate is None else f"{rate:.2f}"
        rows.append([p, shown, ratio, slo["bound"][p]])
    print_table(
        f"highest rate with mean JCT <= {slo['slo_x']:g} x {slo['reference']}'s at load "
        f"{slo['reference_load']:g} ({slo['threshold_s']:.2f} s)",
        ["policy", "req/s", f"x {slo['reference']}", "on the grid"],
        rows,
        right={"req/s", f"x {slo['reference']}"},
    )


def write_plots(
    report: Mapping[str, Any],
    jcts: Mapping[str, Sequence[float]],
    plot: Path | None,
    curve_plot: Path | None,
) -> None:
    """--plot (the JCT CDF at the --load point) and --curve-plot (mean JCT against rate)."""
    from ember.bench.sched_plot import plot_curve, plot_jct_cdf

    if plot is not None:
        plot_jct_cdf(jcts, plot, title(report["workload"]))
    if curve_plot is not None:
        w = report["workload"]
        head = (
            f"{Path(str(w['trace'])).name}: {w['requests']} requests, "
            f"prompts x{w['prompt_scale']:g}, outputs x{w['output_scale']:g}"
        )
        plot_curve(report["curve"], report["slo"]["threshold_s"], curve_plot, head)
