"""The report of `ember bench cluster` and `ember sim`: per placement policy, TTFT and
end-to-end latency (mean, P50, P99), cold starts by the tier they loaded from,
migrations, starts that waited for a slot and time-outs; a text table and a TTFT CDF.

Both commands build a `RequestOutcome` per request and one `policy_summary` per policy,
and put the summaries under "policies" in their JSON: {"policies": {name: summary}}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TIERS = ("dram", "disk", "registry")


@dataclass(frozen=True)
class RequestOutcome:
    model: str
    arrival_s: float
    ttft_s: float | None  # None: no first token (timed out or failed)
    e2e_s: float | None
    start_tier: str | None  # "dram" | "disk" | "registry" if it waited for a cold start, else None
    waited_for_slot: bool
    timed_out: bool
    error: str | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between ranks; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def policy_summary(
    outcomes: Sequence[RequestOutcome],
    *,
    starts: Mapping[str, int],
    migrations: int,
    reclaims: int = 0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One policy's figures (seconds); latencies over the requests that got a token."""
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    e2es = [o.e2e_s for o in outcomes if o.e2e_s is not None]
    return {
        "mean_ttft_s": _mean(ttfts),
        "p50_ttft_s": percentile(ttfts, 50),
        "p99_ttft_s": percentile(ttfts, 99),
        "mean_e2e_s": _mean(e2es),
        "p99_e2e_s": percentile(e2es, 99),
        "starts": {tier: int(starts.get(tier, 0)) for tier in sorted({*TIERS, *starts})},
        "migrations": migrations,
        "reclaims": reclaims,  # idle instances stopped early for a start's slot
        "waited_for_slot": sum(o.waited_for_slot for o in outcomes),
        "timeouts": sum(o.timed_out for o in outcomes),
        "errors": sum(o.error is not None for o in outcomes),
        "requests": len(outcomes),
        **(extra or {}),
    }


def _policies(report: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    inner = report.get("policies", report)
    return inner if isinstance(inner, Mapping) else {}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


_COLUMNS = ("policy", "mean TTFT s", "P50 TTFT s", "P99 TTFT s", "mean E2E s", "P99 E2E s")


def render_table(report: Mapping[str, Any]) -> str:
    """A plain text table, one row per policy: latencies, starts by tier (dram/disk/
    registry), migrations, idle instances reclaimed, waits for a slot, time-outs;
    `report` is {"policies": {...}} or the policies mapping itself."""
    columns = [*_COLUMNS, "starts d/s/r", "migr", "reclaim", "waited", "timeouts"]
    rows = []
    for name, s in _policies(report).items():
        starts = s.get("starts", {})
        rows.append(
            [
                name,
                *(
                    _fmt(s.get(k))
                    for k in ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "mean_e2e_s", "p99_e2e_s")
                ),
                "/".join(str(starts.get(t, 0)) for t in TIERS),
                _fmt(s.get("migrations")),
                _fmt(s.get("reclaims")),
                _fmt(s.get("waited_for_slot")),
                _fmt(s.get("timeouts")),
            ]
        )
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        cells = (
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    return "\n".join([line(columns), *(line(r) for r in rows)])


def plot_ttft_cdf(
    report_outcomes: Mapping[str, Sequence[RequestOutcome]], path: str | Path, title: str = "TTFT"
) -> None:
    """The CDF of TTFT per policy as a PNG, log-scale seconds (cold starts span decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for policy, outcomes in report_outcomes.items():
        xs = sorted(o.ttft_s for o in outcomes if o.ttft_s is not None)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=policy)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
