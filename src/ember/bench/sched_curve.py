"""Latency against load for `ember bench sched --loads`: which cases run in which
order, and the highest rate at which each policy stays within the SLO.

The SLO is FastServe's headline form: a policy's mean JCT may be at most `slo_x` times
FCFS's mean JCT at the lowest load of the grid (0.1 in the README's runs, where FCFS
is close to a job's bare service time); the rate at which a policy's curve crosses it,
linear between grid points, is the throughput it sustains at that latency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

from ember.bench.sched_cases import Case, PolicyResult, PolicySpec

REFERENCE = "fcfs"  # the SLO's reference policy, and the policy whose capacity sets the loads


def case_label(spec: PolicySpec, swap: str | None, swaps: Sequence[str | None], swapping: bool) -> str:
    """A row's name: the policy's, with the swap mode when several are compared and the
    policy swaps at all (fcfs recomputes whatever the mode: one row)."""
    if len(swaps) > 1 and swapping and swap is not None:
        return f"{spec.label}/{swap}"
    return spec.label


def plan_cases(
    specs: Sequence[PolicySpec],
    swaps: Sequence[str | None],
    loads: Sequence[float | None],
    repeats: int,
    swapping: Mapping[str, bool],
) -> list[Case]:
    """Every (policy, swap mode) at every load, `repeats` times, interleaved: within a
    load and repeat every row runs once, the rows' order rotating by one each repeat,
    so slow drift of a shared machine is spread over all policies alike.
    `swapping`: scheduler name -> whether it swaps (else one row, whatever the mode)."""
    rows: list[tuple[str, PolicySpec, str | None]] = []
    for spec in specs:
        for swap in swaps:
            label = case_label(spec, swap, swaps, swapping[spec.scheduler])
            if label not in (r[0] for r in rows):
                rows.append((label, spec, swap))
    cases = []
    for load in loads:
        for rep in range(repeats):
            k = rep % len(rows)
            for label, spec, swap in rows[k:] + rows[:k]:
                cases.append(Case(label, spec.scheduler, swap, load, spec.max_num_batched_tokens, rep))
    return cases


@dataclass(frozen=True)
class SloRate:
    """The highest rate within the SLO. `bound`: "crossed" (interpolated between two grid
    points), "all within" (the grid's highest rate: the true figure is at least this)
    or "none within" (the curve starts above the SLO: rate None)."""

    rate_req_s: float | None
    bound: Literal["crossed", "all within", "none within"]


def max_rate_within(points: Sequence[tuple[float, float]], threshold_s: float) -> SloRate:
    """points: (rate req/s, mean JCT s) in any order. The rate where mean JCT first rises
    above `threshold_s`, linear between the last point within and the first above."""
    pts = sorted(points)
    if not pts or pts[0][1] > threshold_s:
        return SloRate(None, "none within")
    for (r0, j0), (r1, j1) in pairwise(pts):
        if j1 > threshold_s:
            return SloRate(r0 + (threshold_s - j0) / (j1 - j0) * (r1 - r0), "crossed")
    return SloRate(pts[-1][0], "all within")


def curve_point(load: float, rate_req_s: float, result: PolicyResult) -> dict[str, Any]:
    """One grid point of one policy, as the JSON's "curve" lists it."""
    return {"load": load, "rate_req_s": rate_req_s, **result.to_json()}


def slo_report(
    curve: Mapping[str, Sequence[Mapping[str, Any]]], slo_x: float
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """max_rate_within_slo per policy, and how it was set (reference, threshold, bounds)."""
    ref = min(curve[REFERENCE], key=lambda p: p["load"])
    threshold = slo_x * ref["mean_jct_s"]
    rates: dict[str, float | None] = {}
    bounds: dict[str, str] = {}
    for label, pts in curve.items():
        r = max_rate_within([(p["rate_req_s"], p["mean_jct_s"]) for p in pts], threshold)
        rates[label], bounds[label] = r.rate_req_s, r.bound
    info = {
        "slo_x": slo_x,
        "reference": REFERENCE,
        "reference_load": ref["load"],
        "reference_mean_jct_s": ref["mean_jct_s"],
        "threshold_s": threshold,
        "bound": bounds,
    }
    return rates, info
