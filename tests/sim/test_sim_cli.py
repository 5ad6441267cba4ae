"""`ember sim` end to end at a tiny size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ember.cli import app

pytestmark = pytest.mark.timeout(120)


def test_sim_end_to_end(tmp_path: Path) -> None:
    args = ["sim", "--servers", "2", "--models", "4", "--requests", "60", "--rate", "0.5", "--seed", "1",
            "--policies", "startup-time-aware,remote-only",
            "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "cdf.png")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "startup-time-aware" in result.output and "simulated requests per wall second" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["policies"]) == {"startup-time-aware", "remote-only"}
    for p in report["policies"].values():
        assert p["requests"] == 60 and p["wall_s"] >= 0
        assert {
            "mean_ttft_s",
            "p50_ttft_s",
            "p99_ttft_s",
            "mean_e2e_s",
            "p99_e2e_s",
            "starts",
            "migrations",
        } <= set(p)
    assert report["policies"]["remote-only"]["starts"]["dram"] == 0
    assert (tmp_path / "cdf.png").read_bytes()[:4] == b"\x89PNG"


def test_sim_trace_and_bad_input(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(
        "arrived_at,model,num_prefill_tokens,num_decode_tokens\n0,opt-6.7b-0,10,5\n1,opt-6.7b-0,10,5\n"
    )
    result = CliRunner().invoke(app, ["sim", "--models", "1", "--trace", str(trace), "--policies", "random"])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, ["sim", "--policies", "fastest"])
    assert bad.exit_code == 1 and "unknown policies fastest" in bad.output
