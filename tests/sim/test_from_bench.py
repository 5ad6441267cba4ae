"""`ember sim --from-bench`: the SimConfig and workload a bench cluster JSON gives, and
the errors a bad one gets. The JSON here is hand-written, as bench/cluster.py writes it."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from ember.bench.cluster_workload import ClusterRequest
from ember.bench.code_version import code_commit
from ember.cluster.migration_cost import PRIOR_FIXED_S, PRIOR_S_PER_TOKEN
from ember.errors import InvalidRequestError
from ember.sim.config import ModelSpec, ServerSpec, SimConfig, load_config
from ember.sim.from_bench import bench_run, code_note, load_bench, weighted_median
from ember.sim.run import WorkloadSpec, bench_workload, run_policies

pytestmark = pytest.mark.timeout(60)

TRACE = [
    {"arrived_at": 0.0, "model": "a", "num_prefill_tokens": 100, "num_decode_tokens": 10},
    {"arrived_at": 0.5, "model": "b", "num_prefill_tokens": 40, "num_decode_tokens": 5},
    {"arrived_at": 7.25, "model": "a", "num_prefill_tokens": 20, "num_decode_tokens": 3},
]


def _policy(mean_ttft: float, loads: dict[str, tuple[int, float | None, float | None]]) -> dict[str, Any]:
    return {
        "mean_ttft_s": mean_ttft, "p50_ttft_s": mean_ttft / 2, "p99_ttft_s": mean_ttft * 3,
        "mean_e2e_s": mean_ttft + 1.0, "starts": {"dram": 1, "disk": 0, "registry": 2},
        "bandwidths": {
            "node0": {"dram": 9e9, "disk": 4e8, "registry": 1e8, "overhead_s": 0.1},
            "node1": {"dram": 7e9, "disk": 2e8, "registry": 3e8, "overhead_s": 0.1},
        },
        "loads": {t: {"loads": n, "bytes_per_s": bps, "overhead_s": o} for t, (n, bps, o) in loads.items()},
        "inference": {"a": {"prefill_s_per_token": 0.002, "decode_s_per_step": 0.03, "warm_requests": 3}},
    }  # fmt: skip


def bench_json() -> dict[str, Any]:
    """Two nodes of two slots; models a (warm in both runs) and b (never warm); no disk
    load in either run (its bandwidth falls back to the estimator's snapshots)."""
    sta = _policy(1.0, {"dram": (1, 5e9, 0.01), "disk": (0, None, None), "registry": (3, 1e8, 0.05)})
    sta["inference"]["a"] = {"prefill_s_per_token": 0.004, "decode_s_per_step": 0.05, "warm_requests": 1}
    remote = _policy(2.0, {"dram": (0, None, None), "disk": (0, None, None), "registry": (4, 2e8, 0.03)})
    return {
        "benchmark": "cluster",
        "cluster": {
            "nodes": 2, "slots": 2, "dram_bytes": 300_000_000, "disk_bytes": 500_000_000, "keep_alive_s": 2.0,
            "max_instances": 1, "max_batch": 4, "start_timeout_s": 60.0, "max_model_len": 1024,
        },
        "models": [
            {"name": "a", "nbytes": 100_000_000, "slots": 1},
            {"name": "b", "nbytes": 200_000_000, "slots": 2},
        ],
        "requests": len(TRACE),
        "trace": copy.deepcopy(TRACE),
        "policies": {"startup-time-aware": sta, "remote-only": remote},
    }  # fmt: skip


def test_the_config_is_the_real_runs() -> None:
    run = bench_run(bench_json())
    # registry: 3 loads at 1e8 and 4 at 2e8 -> weighted median 2e8; dram: its one load;
    # disk: no load -> the median of the snapshots (4e8, 2e8, 4e8, 2e8 -> 3e8);
    # overhead: the medians 0.01 (x1), 0.05 (x3), 0.03 (x4) -> 0.03
    server = ServerSpec(
        gpus=2, dram_bytes=300_000_000, ssd_bytes=500_000_000, dram_bps=5e9, ssd_bps=3e8, network_bps=2e8,
        overhead_s=0.03,
    )  # fmt: skip
    # a: 0.004 (1 warm request) and 0.002 (3) -> 0.002 s/token, 0.03 s/step; b: never warm,
    # a's cost per byte times b's bytes
    models = (ModelSpec("a", 100_000_000, 1, 0.002, 0.03), ModelSpec("b", 200_000_000, 2, 0.004, 0.06))
    expected = SimConfig(
        servers=2, server=server, models=models, keep_alive_s=2.0, max_batch=4, max_instances=1,
        start_timeout_s=60.0, migration_s_per_token=PRIOR_S_PER_TOKEN, migration_fixed_s=PRIOR_FIXED_S,
    )  # fmt: skip
    assert run.config == expected
    linked = bench_json()
    linked["cluster"]["registry_bps"] = 125e6  # bench cluster --registry-gbps 1
    assert bench_run(linked).config == dataclasses.replace(expected, registry_link_bps=125e6)
    assert run.calibration["bytes_per_s_from"] == {
        "dram": "1 loads",
        "disk": "estimator snapshot",
        "registry": "7 loads",
    }
    assert run.assumed == ["b: never warm; inference costs: the others' per byte"]
    assert list(run.real) == ["startup-time-aware", "remote-only"]


def test_per_policy_physics_come_from_that_policys_run_alone() -> None:
    data = bench_json()
    remote = bench_run(data, "remote-only").config
    # its 4 registry loads at 2e8; no DRAM or disk load: its own snapshots' medians
    assert (remote.server.network_bps, remote.server.dram_bps, remote.server.ssd_bps) == (2e8, 8e9, 3e8)
    assert remote.server.overhead_s == 0.03
    assert remote.models[0].prefill_s_per_token == 0.002
    sta = bench_run(data, "startup-time-aware").config
    assert (sta.server.network_bps, sta.server.dram_bps, sta.server.overhead_s) == (1e8, 5e9, 0.05)
    assert (sta.models[0].prefill_s_per_token, sta.models[0].decode_s_per_step) == (0.004, 0.05)
    assert sta.servers == remote.servers == 2 and sta.models[1].nbytes == 200_000_000
    with pytest.raises(InvalidRequestError, match="no run of policy 'random'"):
        bench_run(data, "random")
    data["policies"]["remote-only"]["inference"] = {}  # every request of its run was a cold start
    cold = bench_run(data, "remote-only")
    assert cold.config.models[0].prefill_s_per_token == 0.004  # the one run that measured it
    assert cold.assumed[0].startswith("remote-only: no request found an instance warm")


def test_an_older_json_takes_the_bench_values_of_its_time_and_says_so() -> None:
    data = bench_json()
    for key in ("max_instances", "max_batch", "start_timeout_s"):
        del data["cluster"][key]
    for m in data["models"]:
        del m["slots"]
    del data["trace"]
    run = bench_run(data)
    assert (run.config.max_batch, run.config.max_instances, run.config.start_timeout_s) == (8, 1, 300.0)
    assert [m.slots for m in run.config.models] == [1, 1]
    assert run.trace is None
    assert sum("before its JSON recorded it" in a for a in run.assumed) == 3
    assert any(a.startswith("slots: 1") for a in run.assumed)
    with pytest.raises(InvalidRequestError, match="records no trace") as e:
        bench_workload(run, run.config, WorkloadSpec(requests=0), generate=False, seed=0)
    assert e.value.param == "trace"


def test_the_recorded_trace_is_replayed_exactly() -> None:
    run = bench_run(bench_json())
    expected = [
        ClusterRequest(r["arrived_at"], r["model"], r["num_prefill_tokens"], r["num_decode_tokens"])
        for r in TRACE
    ]
    assert run.trace == expected
    workload = bench_workload(run, run.config, WorkloadSpec(requests=0), generate=False, seed=0)
    assert workload == expected
    assert bench_workload(run, run.config, WorkloadSpec(requests=2), generate=False, seed=0) == expected[:2]
    _, outcomes = run_policies(run.config, workload, ["remote-only"], seed=0)
    got = [(o.arrival_s, o.model) for o in outcomes["remote-only"]]
    assert got == [(r.arrival_s, r.model) for r in expected]
    # the first request: a registry load (1 MB at 2e8 B/s) + the overhead, then 100 tokens of prefill
    first = outcomes["remote-only"][0]
    assert first.start_tier == "registry"
    assert first.ttft_s == pytest.approx(100_000_000 / 2e8 + 0.03 + 100 * 0.002)
    assert first.e2e_s == pytest.approx(first.ttft_s + 10 * 0.03)


def test_config_file_and_flags_override_the_bench(tmp_path: Path) -> None:
    run = bench_run(bench_json())
    toml = tmp_path / "whatif.toml"
    toml.write_text("keep_alive_s = 30.0\n[server]\ndram_bytes = 9\n")
    cfg = load_config(toml, run.config, servers=5)
    assert (cfg.servers, cfg.keep_alive_s, cfg.server.dram_bytes) == (5, 30.0, 9)
    assert cfg.server.network_bps == run.config.server.network_bps and cfg.models == run.config.models
    assert load_config(None, run.config) == run.config
    assert len(load_config(None, run.config, models=3).models) == 3  # --models: the zoo instead


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["cluster"].pop("nodes"), "cluster.nodes"),
        (lambda d: d["cluster"].update(dram_bytes="lots"), "cluster.dram_bytes"),
        (lambda d: d.pop("cluster"), "cluster"),
        (lambda d: d.pop("models"), "models"),
        (lambda d: d["models"][1].pop("nbytes"), "models[1].nbytes"),
        (lambda d: d["policies"]["remote-only"].pop("loads"), "policies.remote-only.loads"),
        (lambda d: d["policies"]["startup-time-aware"].pop("inference"),
         "policies.startup-time-aware.inference"),
        (lambda d: d["trace"][2].update(num_prefill_tokens=0), "trace[2]"),
        (lambda d: d["trace"][1].pop("model"), "trace[1].model"),
        (lambda d: d.update(policies={}), "policies"),
    ],
)  # fmt: skip
def test_a_bad_or_missing_field_is_named(edit: Any, field: str) -> None:
    data = bench_json()
    edit(data)
    with pytest.raises(InvalidRequestError) as e:
        bench_run(data)
    assert f"field {field} " in e.value.message and e.value.param == "from_bench"


def test_no_bandwidth_at_all_for_a_tier_is_named() -> None:
    data = bench_json()
    for p in data["policies"].values():
        for node in p["bandwidths"].values():
            del node["disk"]
    with pytest.raises(InvalidRequestError, match=r"no disk load .*policies\.\*\.loads\.disk"):
        bench_run(data)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="no bench result"):
        load_bench(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidRequestError, match="cannot read"):
        load_bench(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "sched"}))
    with pytest.raises(InvalidRequestError, match="not an `ember bench cluster` JSON"):
        load_bench(tmp_path / "other.json")


def test_weighted_median() -> None:
    assert weighted_median([(1.0, 1), (5.0, 1), (3.0, 1)]) == 3.0
    assert weighted_median([(1.0, 5), (100.0, 4)]) == 1.0
    assert weighted_median([(1.0, 4), (100.0, 5)]) == 100.0
    assert weighted_median([(2.0, 1), (4.0, 1)]) == 2.0  # the lower middle
    with pytest.raises(ValueError):
        weighted_median([])


def test_a_run_of_other_code_is_noted(tmp_path: Path) -> None:
    assert "does not say which code it ran (field code)" in (code_note(bench_json(), "abc") or "")
    data = {**bench_json(), "code": "abc"}
    assert code_note(data, "abc") is None and code_note(data, None) is None
    assert "ran code abc, this is def" in (code_note(data, "def") or "")
    assert code_commit(tmp_path) is None  # not a checkout
    ours = code_commit()
    assert ours is None or len(ours.split("+")[0]) == 40
