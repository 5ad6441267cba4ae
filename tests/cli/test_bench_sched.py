"""`ember bench sched` once, at a tiny size on a tiny random model: the report's shape;
and its flags' errors, which come before any model loads."""

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
    "p50_iteration_s", "p90_iteration_s", "p99_iteration_s", "iterations",
    "preemptions", "swaps_out", "swaps_in", "recomputations", "runs_mean_jct_s",
}  # fmt: skip


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("sched")(sched_command)
    app.command("other")(lambda: None)  # a group, so the command is named as in `ember bench sched`
    return app


@pytest.mark.timeout(300)
def test_bench_sched_reports_every_policy_along_the_curve(
    tiny_llama: tuple[Path, Any], tmp_path: Path
) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "arrived_at,num_prefill_tokens,num_decode_tokens\n0,40,6\n0.01,10,3\n0.02,60,8\n0.05,20,2\n"
    )
    out_json, out_png = tmp_path / "results" / "r.json", tmp_path / "plots" / "cdf.png"  # dirs made
    curve_png = tmp_path / "plots" / "curve.png"
    args = ["sched", "--model", str(tiny_llama[0]), "--trace", str(trace), "--num-requests", "3",
            "--prompt-scale", "0.5", "--output-scale", "1", "--max-num-seqs", "2",
            "--policies", "fcfs,mlfq,fcfs@16,default", "--swap", "proactive,off", "--loads", "0.5,1",
            "--kv-budget", str(12 * 16 * 1024), "--swap-bytes", str(4 * 16 * 1024),
            "--json", str(out_json), "--plot", str(out_png), "--curve-plot", str(curve_png)]  # fmt: skip
    result = CliRunner().invoke(_app(), args)
    assert result.exit_code == 0, result.output
    report = json.loads(out_json.read_text())
    assert set(report) == {"workload", "policies", "curve", "max_rate_within_slo", "slo"}
    w = report["workload"]
    assert w["requests"] == 3 and w["measured_capacity_req_s"] > 0 and w["rate_scale"] > 0
    assert (w["prompt_scale"], w["output_scale"], w["load"]) == (0.5, 1.0, 1.0)
    assert w["engine"]["kv_cache_bytes"] == 12 * 16 * 1024 and w["engine"]["max_num_seqs"] == 2
    assert w["engine"]["swap_bytes"] == 4 * 16 * 1024
    labels = {"fcfs", "mlfq/proactive", "mlfq/off", "fcfs@16", "default/proactive", "default/off"}
    assert set(report["policies"]) == labels == set(report["curve"]) == set(report["max_rate_within_slo"])
    for r in report["policies"].values():
        assert set(r) == FIELDS
        assert 0 < r["p50_jct_s"] <= r["p99_jct_s"] and r["throughput_tok_s"] > 0
        assert 0 < r["p50_iteration_s"] <= r["p90_iteration_s"] <= r["p99_iteration_s"]
    for points in report["curve"].values():
        assert [p["load"] for p in points] == [0.5, 1.0]
        assert points[0]["rate_req_s"] < points[1]["rate_req_s"]
    for png in (out_png, curve_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mlfq/off" in result.output and "latency against load" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate-scale", "fast"], "rate-scale"),
        (["--length-scale", "0.1", "--prompt-scale", "0.1"], "--length-scale sets both"),
        (["--length-scale", "0.1", "--output-scale", "1"], "--length-scale sets both"),
        (["--prompt-scale", "0"], "--prompt-scale must be positive"),
        (["--loads", "0.1,x"], "--loads takes numbers"),
        (["--loads", "0,0.5"], "each load must be in"),
        (["--loads", "0.5,3"], "each load must be in"),
        (["--loads", "0.5,0.5"], "twice"),
        (["--loads", "0.5", "--policies", "mlfq,srpt"], "add fcfs"),
        (["--policies", "lifo"], "unknown policy 'lifo'"),
        (["--policies", "fcfs@"], "positive integer"),
        (["--policies", "fcfs@x"], "positive integer"),
        (["--burstiness", "0.5"], "give --request-rate too"),
        (["--request-rate", "2", "--rate-scale", "3"], "give one"),
        (["--request-rate", "-1"], "--request-rate must be a positive number"),
        (["--request-rate", "2", "--load", "0.5"], "fractions of FCFS's capacity"),
        (["--request-rate", "auto", "--burstiness", "0"], "burstiness must be positive"),
        (["--curve-plot", "c.png"], "give --loads"),
        (["--swap", "proactive,sideways"], "unknown swap mode 'sideways'"),
        (["--slo-x", "0", "--loads", "0.1,0.5"], "slo-x"),
    ],
)
def test_bad_flags_are_clear_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(_app(), ["sched", "--model", "x", "--trace", "t.csv", *args])
    assert result.exit_code != 0
    assert message in str(result.exception), result.exception
