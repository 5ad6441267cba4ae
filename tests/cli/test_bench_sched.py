"""`ember bench sched` once, at a tiny size on a tiny random model: the report's shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from ember.cli.bench_sched import sched_command

FIELDS = {
    "mean_jct_s", "p50_jct_s", "p99_jct_s",
    "mean_ttft_s", "p50_ttft_s", "p99_ttft_s",
    "mean_tpot_s", "p50_tpot_s", "p99_tpot_s",
    "mean_norm_latency_s", "throughput_tok_s",
    "preemptions", "swaps_out", "swaps_in", "recomputations",
}  # fmt: skip


@pytest.mark.timeout(240)
def test_bench_sched_reports_every_policy(tiny_llama: tuple[Path, Any], tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "arrived_at,num_prefill_tokens,num_decode_tokens\n0,40,6\n0.01,10,3\n0.02,60,8\n0.05,20,2\n"
    )
    app = typer.Typer()
    app.command("sched")(sched_command)
    app.command("other")(lambda: None)  # a group, so the command is named as in `ember bench sched`
    out_json, out_png = tmp_path / "results" / "r.json", tmp_path / "plots" / "cdf.png"  # dirs made
    args = ["sched", "--model", str(tiny_llama[0]), "--trace", str(trace), "--num-requests", "3",
            "--length-scale", "0.5", "--policies", "fcfs,mlfq,srpt", "--kv-budget", str(12 * 16 * 1024),
            "--swap-bytes", str(4 * 16 * 1024), "--json", str(out_json), "--plot", str(out_png)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out_json.read_text())
    assert set(report) == {"workload", "policies"}
    w = report["workload"]
    assert w["requests"] == 3 and w["measured_capacity_req_s"] > 0 and w["rate_scale"] > 0
    assert w["engine"]["kv_cache_bytes"] == 12 * 16 * 1024
    assert w["engine"]["swap_bytes"] == 4 * 16 * 1024
    assert set(report["policies"]) == {"fcfs", "mlfq", "srpt"}
    for r in report["policies"].values():
        assert set(r) == FIELDS
        assert 0 < r["p50_jct_s"] <= r["p99_jct_s"] and r["throughput_tok_s"] > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mlfq" in result.output


def test_bad_rate_scale_is_a_clear_error(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("sched")(sched_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["sched", "--model", "x", "--trace", "t.csv", "--rate-scale", "fast"])
    assert result.exit_code != 0
    assert "rate-scale" in str(result.exception)
