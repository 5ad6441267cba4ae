"""The comparison of a simulation with a real run, on fixed numbers; and `ember sim
--from-bench --compare` end to end on a tiny hand-written bench JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ember.cli import app
from ember.sim.compare import combine_runs, compare, render_comparison
from tests.sim.test_from_bench import bench_json

pytestmark = pytest.mark.timeout(120)


def _s(mean: float, starts: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "mean_ttft_s": mean, "p50_ttft_s": mean / 2, "p99_ttft_s": 2 * mean, "mean_e2e_s": mean + 1,
        "starts": starts or {},
    }  # fmt: skip


REAL = {"a": _s(1.0, {"dram": 3, "registry": 1}), "b": _s(1.1), "c": _s(2.0), "d": _s(4.0)}
SIM = {"a": _s(1.2), "b": _s(1.5), "c": _s(1.45), "d": _s(2.9)}


def test_ratios_and_the_tolerance() -> None:
    c = compare(REAL, SIM, tolerance=0.25, spread=0.2)
    ratios = {p.policy: p.ratio for p in c.policies}
    assert ratios == pytest.approx({"a": 1.2, "b": 1.5 / 1.1, "c": 0.725, "d": 0.725})
    assert [p.policy for p in c.policies if p.within] == ["a"]
    assert c.policies[0].real["p99_ttft_s"] == 2.0 and c.policies[0].sim["mean_e2e_s"] == 2.2
    assert c.policies[0].starts_real == {"dram": 3, "registry": 1}
    assert not c.passed
    loose = compare(REAL, SIM, tolerance=0.4, spread=0.2)
    assert all(p.within for p in loose.policies)


def test_ordering_only_of_pairs_the_real_run_separates() -> None:
    c = compare(REAL, SIM, spread=0.2)
    # a-b differ by 10% (within the spread): not judged; every other pair is
    got = {(p.faster, p.slower): p.agrees for p in c.pairs}
    assert got == {("a", "c"): True, ("a", "d"): True, ("b", "c"): False, ("b", "d"): True, ("c", "d"): True}
    bc = next(p for p in c.pairs if (p.faster, p.slower) == ("b", "c"))
    assert bc.real_gap == pytest.approx(2.0 / 1.1 - 1) and bc.sim_gap == pytest.approx(1.45 / 1.5 - 1)
    assert len(compare(REAL, SIM, spread=0.05).pairs) == 6
    assert compare(REAL, SIM, spread=5.0).pairs == []


def test_policies_only_one_side_has_are_left_out_and_missing_figures_fail() -> None:
    c = compare({"a": _s(1.0), "x": _s(2.0)}, {"a": {"mean_ttft_s": None}, "y": _s(1.0)})
    assert [p.policy for p in c.policies] == ["a"]
    assert c.policies[0].ratio is None and not c.policies[0].within and not c.passed


def test_repeats_average_the_figures_and_measure_each_policys_spread() -> None:
    again = {"a": _s(1.5, {"dram": 9}), "b": _s(1.1), "c": _s(2.2)}  # no d in the repeat
    real, spreads = combine_runs([REAL, again])
    assert real["a"]["mean_ttft_s"] == pytest.approx(1.25) and real["a"]["p99_ttft_s"] == pytest.approx(2.5)
    assert real["a"]["starts"] == {"dram": 3, "registry": 1}  # the first run's
    assert real["d"]["mean_ttft_s"] == 4.0
    assert spreads == pytest.approx({"a": 0.5, "b": 0.0, "c": 0.1})
    c = compare(real, SIM, spread=0.2, spreads=spreads)
    # a (1.25) vs b (1.1): 14%, within a's 50%; a vs c (2.1): 68% beyond 50% and 10%;
    # c vs d: 90%, beyond c's 10% and d's assumed 20%
    got = {(p.faster, p.slower) for p in c.pairs}
    assert got == {("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")}
    assert "run-to-run spread of mean TTFT over the repeats: a 50%, b 0%, c 10%" in render_comparison(c)
    assert c.to_json()["spreads"] == pytest.approx(spreads)
    wide = compare(real, SIM, spreads={"a": 0.7})
    assert ("a", "c") not in {(p.faster, p.slower) for p in wide.pairs}


def test_render_and_json() -> None:
    c = compare(REAL, SIM)
    text = render_comparison(c)
    assert "b < c: real +82%, sim -3%: REVERSED" in text
    assert "mean TTFT within 25%: 1/4 policies; order kept: 4/5 pairs; FAIL" in text
    data = json.loads(json.dumps(c.to_json()))
    assert data["policies"]["a"]["ratio"] == pytest.approx(1.2)
    assert data["passed"] is False and data["mean_ttft_within"] is False and data["ordering_agrees"] is False
    assert len(data["pairs"]) == 5 and data["spread"] == 0.2


def test_cli_from_bench_compare_end_to_end(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(bench_json()))
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["sim", "--from-bench", str(bench), "--compare", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean TTFT real/sim" in result.output and "assumed: b: never warm" in result.output
    report = json.loads(out.read_text())
    assert list(report["policies"]) == ["startup-time-aware", "remote-only"]  # the real run's policies
    assert report["config"]["servers"] == 2 and report["config"]["requests"] == 3
    per_policy = report["config"]["from_bench"]["calibration"]["per_policy"]  # each policy its own physics
    assert per_policy["startup-time-aware"]["bytes_per_s"]["registry"] == 1e8
    assert per_policy["remote-only"]["bytes_per_s"]["registry"] == 2e8
    assert set(report["comparison"]["policies"]) == {"startup-time-aware", "remote-only"}
    # a and b from the registry; a again after its keep-alive: from DRAM, but remote-only downloads
    assert report["policies"]["remote-only"]["starts"] == {"dram": 0, "disk": 0, "registry": 3}
    assert report["policies"]["startup-time-aware"]["starts"] == {"dram": 1, "disk": 0, "registry": 2}


def test_cli_pooled_calibration_is_one_config_for_every_policy(tmp_path: Path) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(bench_json()))
    out = tmp_path / "r.json"
    args = ["sim", "--from-bench", str(bench), "--calibrate", "pooled", "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        json.loads(out.read_text())["config"]["from_bench"]["calibration"]["bytes_per_s"]["registry"] == 2e8
    )
    bad = CliRunner().invoke(app, [*args[:-2], "--calibrate", "mine"])
    assert bad.exit_code == 1 and "--calibrate takes pooled or per-policy" in bad.output


def test_cli_compare_with_a_repeat(tmp_path: Path) -> None:
    data = bench_json()
    bench, repeat = tmp_path / "bench.json", tmp_path / "again.json"
    bench.write_text(json.dumps(data))
    data["policies"]["remote-only"]["mean_ttft_s"] = 3.0
    repeat.write_text(json.dumps(data))
    out = tmp_path / "r.json"
    args = ["sim", "--from-bench", str(bench), "--compare", "--repeat", str(repeat), "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    comparison = json.loads(out.read_text())["comparison"]
    assert comparison["policies"]["remote-only"]["real"]["mean_ttft_s"] == 2.5
    assert comparison["spreads"] == {"startup-time-aware": 0.0, "remote-only": 0.5}
    assert comparison["repeats"] == [str(repeat)]
    data["trace"].pop()
    repeat.write_text(json.dumps(data))
    bad = CliRunner().invoke(app, args)
    assert bad.exit_code == 1 and "is not a repeat of the --from-bench run" in bad.output


def test_cli_from_bench_overrides_and_errors(tmp_path: Path) -> None:
    data = bench_json()
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(data))
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,model,num_prefill_tokens,num_decode_tokens\n0,b,10,5\n")
    out = tmp_path / "r.json"
    args = [
        "sim",
        "--from-bench",
        str(bench),
        "--trace",
        str(trace),
        "--servers",
        "3",
        "--policies",
        "random",
    ]
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "assumed: random: not in the real run: the physics pooled over its runs" in result.output
    report = json.loads(out.read_text())
    assert report["config"]["servers"] == 3 and report["config"]["requests"] == 1
    args = ["sim", "--from-bench", str(bench), "--rate", "2", "--requests", "7", "--json", str(out)]
    generated = CliRunner().invoke(app, args)
    assert generated.exit_code == 0, generated.output
    assert json.loads(out.read_text())["config"]["requests"] == 7
    lone = CliRunner().invoke(app, ["sim", "--compare"])
    assert lone.exit_code == 1 and "--from-bench" in lone.output
    stray = CliRunner().invoke(app, ["sim", "--from-bench", str(bench), "--repeat", str(bench)])
    assert stray.exit_code == 1 and "--repeat gives repeats of the real run to --compare" in stray.output
    del data["trace"]
    bench.write_text(json.dumps(data))
    old = CliRunner().invoke(app, ["sim", "--from-bench", str(bench)])
    assert old.exit_code == 1 and "records no trace" in old.output
    del data["cluster"]["slots"]
    bench.write_text(json.dumps(data))
    bad = CliRunner().invoke(app, ["sim", "--from-bench", str(bench), "--trace", str(trace)])
    assert bad.exit_code == 1 and "cluster.slots is missing" in bad.output
