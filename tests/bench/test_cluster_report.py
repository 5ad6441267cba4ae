"""The shared cluster report: summaries, the table and the TTFT CDF plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.bench.cluster_report import RequestOutcome, percentile, plot_ttft_cdf, policy_summary, render_table


def _outcome(ttft: float | None, tier: str | None = None, **kw: object) -> RequestOutcome:
    e2e = None if ttft is None else ttft + 1.0
    return RequestOutcome("m", 0.0, ttft, e2e, tier, bool(kw.get("waited")), bool(kw.get("timed_out")))


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_policy_summary() -> None:
    outs = [_outcome(1.0, "dram"), _outcome(3.0, None, waited=True), _outcome(None, timed_out=True)]
    s = policy_summary(outs, starts={"dram": 1}, migrations=2, extra={"wall_s": 0.5})
    assert s["mean_ttft_s"] == 2.0 and s["p50_ttft_s"] == 2.0 and s["mean_e2e_s"] == 3.0
    assert s["starts"] == {"dram": 1, "disk": 0, "registry": 0}
    assert (s["migrations"], s["waited_for_slot"], s["timeouts"], s["requests"]) == (2, 1, 1, 3)
    assert s["wall_s"] == 0.5
    empty = policy_summary([], starts={}, migrations=0)
    assert empty["mean_ttft_s"] is None and empty["requests"] == 0


def test_render_table() -> None:
    s = policy_summary([_outcome(1.25, "disk")], starts={"disk": 1}, migrations=0)
    text = render_table({"policies": {"random": s, "startup-time-aware": s}})
    lines = text.splitlines()
    assert lines[0].startswith("policy") and "mean TTFT s" in lines[0]
    assert lines[1].startswith("random") and "1.250" in lines[1] and "0/1/0" in lines[1]
    assert lines[2].startswith("startup-time-aware")


def test_plot(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cdf.png"
    plot_ttft_cdf({"a": [_outcome(0.5), _outcome(2.0)], "b": [_outcome(None)]}, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
