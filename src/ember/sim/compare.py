"""The simulator against a real run: per policy real vs simulated TTFT and E2E, the
ratio sim/real of mean TTFT against a tolerance (issue 15: within 25%), and whether the
simulator orders the policies as the real run did.

Ordering is judged only where the real run separates two policies: their real mean
TTFTs differ by more than the run-to-run spread of a mean TTFT, relative to the smaller
of the two. bench cluster runs each policy once, so the spread is assumed (a flag),
unless repeats of the run are given: then the real figures are the repeats' means and
each policy's spread is measured (combine_runs). The simulator agrees when it puts the
pair the same way round.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

METRICS = ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "mean_e2e_s")
DEFAULT_TOLERANCE = 0.25  # |sim/real - 1| of mean TTFT (issue 15)
DEFAULT_SPREAD = 0.2  # assumed run-to-run spread of a policy's mean TTFT, relative


@dataclass(frozen=True)
class TtftMatch:
    policy: str
    real: dict[str, float | None]  # METRICS, seconds
    sim: dict[str, float | None]
    ratio: float | None  # sim / real mean TTFT; None when either is missing or real is 0
    within: bool  # |ratio - 1| <= tolerance
    starts_real: dict[str, int]  # by tier
    starts_sim: dict[str, int]


@dataclass(frozen=True)
class PairOrder:
    faster: str  # by the real mean TTFT
    slower: str
    real_gap: float  # slower / faster - 1 (real)
    sim_gap: float | None  # the same ratio in the simulation (negative: reversed)
    agrees: bool


@dataclass(frozen=True)
class Comparison:
    tolerance: float
    spread: float  # assumed, where `spreads` does not give a policy's
    policies: list[TtftMatch]
    pairs: list[PairOrder]  # only those the real run separates by more than the spread
    spreads: dict[str, float] | None = None  # per policy, measured over repeats

    @property
    def passed(self) -> bool:
        return all(p.within for p in self.policies) and all(p.agrees for p in self.pairs)

    def to_json(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "spread": self.spread,
            "spreads": self.spreads,
            "mean_ttft_within": all(p.within for p in self.policies),
            "ordering_agrees": all(p.agrees for p in self.pairs),
            "passed": self.passed,
            "policies": {p.policy: asdict(p) for p in self.policies},
            "pairs": [asdict(p) for p in self.pairs],
        }


def compare(
    real: Mapping[str, Mapping[str, Any]],
    sim: Mapping[str, Mapping[str, Any]],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    spread: float = DEFAULT_SPREAD,
    spreads: Mapping[str, float] | None = None,
) -> Comparison:
    """Real vs simulated summaries (bench cluster's policy_summary dicts), for the
    policies both have, in the simulation's order. `spreads`: each policy's measured
    spread (combine_runs); a pair is then judged beyond the larger of its two."""
    names = [n for n in sim if n in real]
    matches = [_match(n, real[n], sim[n], tolerance) for n in names]
    pairs = []
    for a, b in itertools.combinations(names, 2):
        ra, rb = _float(real[a].get("mean_ttft_s")), _float(real[b].get("mean_ttft_s"))
        if ra is None or rb is None or min(ra, rb) <= 0:
            continue
        faster, slower = (a, b) if ra <= rb else (b, a)
        gap = _gap(real[slower]["mean_ttft_s"], real[faster]["mean_ttft_s"])
        beyond = spread if spreads is None else max(spreads.get(a, spread), spreads.get(b, spread))
        if gap is None or gap <= beyond:
            continue
        sim_gap = _gap(sim[slower].get("mean_ttft_s"), sim[faster].get("mean_ttft_s"))
        pairs.append(PairOrder(faster, slower, gap, sim_gap, sim_gap is not None and sim_gap > 0))
    return Comparison(tolerance, spread, matches, pairs, dict(spreads) if spreads is not None else None)


def combine_runs(
    runs: Sequence[Mapping[str, Mapping[str, Any]]],
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Repeats of one real run (the same cluster and trace): per policy, each of METRICS
    averaged over the runs that have it, the first run's starts, and the spread of its
    mean TTFT, (max - min) / min over the runs."""
    real: dict[str, dict[str, Any]] = {}
    spreads: dict[str, float] = {}
    for name in runs[0]:
        summaries = [r[name] for r in runs if name in r]
        real[name] = {"starts": _starts(summaries[0])}
        for k in METRICS:
            values = [v for s in summaries if (v := _float(s.get(k))) is not None]
            real[name][k] = sum(values) / len(values) if values else None
        means = [v for s in summaries if (v := _float(s.get("mean_ttft_s"))) is not None and v > 0]
        if len(means) >= 2:
            spreads[name] = max(means) / min(means) - 1.0
    return real, spreads


def _match(name: str, real: Mapping[str, Any], sim: Mapping[str, Any], tolerance: float) -> TtftMatch:
    r = {k: _float(real.get(k)) for k in METRICS}
    s = {k: _float(sim.get(k)) for k in METRICS}
    real_mean, sim_mean = r["mean_ttft_s"], s["mean_ttft_s"]
    ratio = sim_mean / real_mean if sim_mean is not None and real_mean is not None and real_mean > 0 else None
    within = ratio is not None and abs(ratio - 1.0) <= tolerance
    return TtftMatch(name, r, s, ratio, within, _starts(real), _starts(sim))


def _gap(slower: Any, faster: Any) -> float | None:
    if not (_positive(faster) and isinstance(slower, int | float)):
        return None
    return float(slower) / float(faster) - 1.0


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _starts(summary: Mapping[str, Any]) -> dict[str, int]:
    starts = summary.get("starts")
    return {t: int(n) for t, n in starts.items()} if isinstance(starts, dict) else {}


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def render_comparison(c: Comparison) -> str:
    """The comparison as plain text: one row per policy, then the ordered pairs."""
    head = ["policy", "mean TTFT real/sim", "P50 TTFT real/sim", "P99 TTFT real/sim", "mean E2E real/sim"]
    head += ["sim/real", f"within {c.tolerance:.0%}", "starts d/s/r real/sim"]
    rows = []
    for p in c.policies:
        cells = [f"{_fmt(p.real[k])}/{_fmt(p.sim[k])}" for k in METRICS]
        starts = "/".join(_tiers(s) for s in (p.starts_real, p.starts_sim))
        rows.append([p.policy, *cells, _fmt(p.ratio, ".2f"), "pass" if p.within else "FAIL", starts])
    lines = _table(head, rows)
    if c.spreads is None:
        lines.append(
            f"ordering (pairs whose real mean TTFTs differ by more than the assumed spread {c.spread:.0%}):"
        )
    else:
        measured = ", ".join(f"{n} {v:.0%}" for n, v in c.spreads.items())
        lines.append(f"run-to-run spread of mean TTFT over the repeats: {measured}")
        lines.append("ordering (pairs whose real mean TTFTs differ by more than both policies' spreads):")
    if not c.pairs:
        lines.append("  none: the real run does not separate any two policies by more than the spread")
    for pair in c.pairs:
        sim_gap = "-" if pair.sim_gap is None else f"{pair.sim_gap:+.0%}"
        verdict = "same order" if pair.agrees else "REVERSED"
        lines.append(f"  {pair.faster} < {pair.slower}: real {pair.real_gap:+.0%}, sim {sim_gap}: {verdict}")
    within = sum(p.within for p in c.policies)
    agrees = sum(p.agrees for p in c.pairs)
    lines.append(
        f"mean TTFT within {c.tolerance:.0%}: {within}/{len(c.policies)} policies; "
        f"order kept: {agrees}/{len(c.pairs)} pairs; {'PASS' if c.passed else 'FAIL'}"
    )
    return "\n".join(lines)


def _tiers(starts: Mapping[str, int]) -> str:
    return "-".join(str(starts.get(t, 0)) for t in ("dram", "disk", "registry"))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]

    def line(values: Sequence[str]) -> str:
        cells = (
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    return [line(head), *(line(r) for r in rows)]
