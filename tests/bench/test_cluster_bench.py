"""`ember bench cluster` at a tiny size: two tiny models on two nodes, every policy, a
handful of requests; the report's shape, its starts by tier against the controller's
own load records, and which tier each request's start came from."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ember.bench.cluster import ClusterBenchConfig, fit, run_cluster_bench
from ember.bench.cluster_models import MIN_LAYERS, ClusterModel, link_registry, random_models
from ember.bench.cluster_server import BENCH_POLICIES, ClusterShape
from ember.bench.cluster_workload import ClusterRequest
from ember.bench.code_version import code_commit
from ember.bench.random_llama import LADDER, plan_llama
from ember.cli import app
from ember.cli.bench_cluster import parse_policies, parse_sizes
from ember.errors import InvalidRequestError
from ember.sim.from_bench import bench_run
from ember.store.format import read_index

FIELDS = ("mean_ttft_s", "p50_ttft_s", "p99_ttft_s", "mean_e2e_s", "p99_e2e_s", "starts", "migrations")
ENGINE = {"max_model_len": 128, "kv_cache_bytes": 4 << 20, "max_num_seqs": 4, "swap": "off"}
# tiny at 0 and tiny2 at once (both from the registry: the cluster starts empty); tiny again
# long after its keep-alive: its instance went, its weights stayed in DRAM.
WORKLOAD = [
    ClusterRequest(0.0, "tiny", 12, 4),
    ClusterRequest(0.05, "tiny2", 9, 3),
    ClusterRequest(4.0, "tiny", 7, 4),
]


@pytest.fixture(scope="module")
def report(tiny_llama: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path, _ = tiny_llama
    nbytes = read_index(path).total_bytes
    models = [ClusterModel("tiny", path, nbytes), ClusterModel("tiny2", path, nbytes)]
    shape = ClusterShape(
        nodes=2, slots=1, dram_bytes=4 * nbytes, disk_bytes=4 * nbytes, keep_alive_s=0.3,
        start_timeout_s=60.0, engine_options=ENGINE,
    )  # fmt: skip
    cfg = ClusterBenchConfig(BENCH_POLICIES, shape, max_model_len=128, registry_bps=1e9)  # an 8 Gb/s link
    work = tmp_path_factory.mktemp("cluster-bench")
    result = run_cluster_bench(models, WORKLOAD, work, cfg)
    return {"json": result.to_json(), "outcomes": result.outcomes()}


@pytest.mark.slow  # five servers one after another, ~6 s each
@pytest.mark.timeout(300)
def test_every_policy_reports_latencies_and_starts_that_add_up(report: dict[str, Any]) -> None:
    data = report["json"]
    assert list(data["policies"]) == list(BENCH_POLICIES)
    assert data["cluster"]["nodes"] == 2 and data["requests"] == len(WORKLOAD)
    assert data["cluster"]["registry_bps"] == 1e9 and "behind a 8 Gb/s link" in " ".join(data["notes"])
    for name, p in data["policies"].items():
        for f in FIELDS:
            assert f in p, (name, f)
        assert p["errors"] == 0 and p["timeouts"] == 0, name
        assert 0 < p["p50_ttft_s"] <= p["p99_ttft_s"] and p["mean_e2e_s"] >= p["mean_ttft_s"] > 0
        assert set(p["starts"]) == {"dram", "disk", "registry"}
        assert sum(p["starts"].values()) == p["loads_recorded"] >= 2, name  # the controller's own records
        assert sum(p["loads"][t]["loads"] for t in p["starts"]) == p["loads_recorded"]
        outcomes = report["outcomes"][name]
        for tier, n in p["starts"].items():
            assert sum(o.start_tier == tier for o in outcomes) <= n
        assert p["migrations"] == 0  # never a full cluster: nothing to migrate


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_each_start_comes_from_the_tier_the_policy_allows(report: dict[str, Any]) -> None:
    for name, outcomes in report["outcomes"].items():
        first, second, again = outcomes
        assert first.start_tier == "registry" and second.start_tier == "registry", name  # an empty cluster
        assert again.start_tier is not None, name  # its instance had gone after the keep-alive
        if name == "remote-only":
            assert again.start_tier == "registry"
            assert report["json"]["policies"][name]["starts"] == {"dram": 0, "disk": 0, "registry": 3}
        if name.startswith("startup-time-aware"):
            assert again.start_tier == "dram", name  # its node's pool still held it


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_json_records_what_the_simulator_replays(report: dict[str, Any]) -> None:
    data = report["json"]
    cluster = data["cluster"]
    assert (cluster["max_batch"], cluster["max_instances"], cluster["start_timeout_s"]) == (4, 1, 60.0)
    assert cluster["max_model_len"] == 128 and cluster["engine_options"] == ENGINE
    assert [m["slots"] for m in data["models"]] == [1, 1]
    assert data["workload"] == {"seed": 0}  # a workload given as requests records only its seed
    assert data["code"] == code_commit()
    sent = [fit(r, 128) for r in WORKLOAD]
    assert data["trace"] == [
        {"arrived_at": r.arrival_s, "model": r.model, "num_prefill_tokens": r.prompt_tokens,
         "num_decode_tokens": r.output_tokens}
        for r in sent
    ]  # fmt: skip
    read = json.loads(json.dumps(data))  # as `ember sim --from-bench` reads the file
    with pytest.raises(InvalidRequestError, match=r"policies\.\*\.inference"):
        bench_run(read)  # every request here waited for a start: no inference cost was measured
    read["policies"]["random"]["inference"] = {
        "tiny": {"prefill_s_per_token": 0.001, "decode_s_per_step": 0.01, "warm_requests": 1}
    }
    run = bench_run(read)
    assert run.trace == sent and list(run.real) == list(BENCH_POLICIES)
    assert (run.config.servers, run.config.server.gpus, run.config.max_batch) == (2, 1, 4)
    assert run.config.server.dram_bytes == cluster["dram_bytes"] and run.config.keep_alive_s == 0.3
    assert {m.name for m in run.config.models} == {"tiny", "tiny2"}


def test_random_models_are_made_once_with_sizes_in_turn(tmp_path: Path) -> None:
    sizes = [55_000_000, 60_000_000]
    made = random_models(tmp_path / "cache", 3, sizes, files={})
    assert [m.name for m in made] == ["random-0", "random-1", "random-2"]
    for m, size in zip(made, [*sizes, sizes[0]], strict=True):
        assert abs(m.nbytes - size) / size < 0.1
    index = read_index(made[0].checkpoint)
    assert "lm_head.weight" not in index.tensors  # tied, as SmolLM2's
    config = json.loads((made[0].checkpoint / "model" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["hidden_size"] == 128
    assert plan_llama(150_000_000, 4, 49152, tied=True, min_layers=MIN_LAYERS) == (LADDER[1], 3)
    stamp = os.stat(made[0].checkpoint / "index.json").st_mtime_ns
    again = random_models(tmp_path / "cache", 1, sizes, files={})
    assert again[0].checkpoint == made[0].checkpoint
    assert os.stat(again[0].checkpoint / "index.json").st_mtime_ns == stamp  # not written again
    registry = link_registry(made, tmp_path / "registry")
    assert sorted(p.name for p in registry.iterdir()) == ["random-0", "random-1", "random-2"]
    renamed = ClusterModel("random-0", made[1].checkpoint, made[1].nbytes)  # a name now another model's
    link_registry([renamed], registry)
    assert read_index(registry / "random-0").total_bytes == made[1].nbytes
    shutil.rmtree(tmp_path / "cache")


def test_bad_flags_are_clear_errors() -> None:
    assert parse_policies("random, remote-only") == ("random", "remote-only")
    for bad in ("", "random,random", "fastest"):
        with pytest.raises(InvalidRequestError, match="--policies"):
            parse_policies(bad)
    assert parse_sizes("0.2GB,1GB") == [200_000_000, 1_000_000_000]
    with pytest.raises(InvalidRequestError, match="cannot read size"):
        parse_sizes("big")
    runner = CliRunner()
    for args, message in (
        (["--policies", "fastest"], "--policies"),
        (["--random-models", "2", "--models", "a"], "not both"),
        (["--random-models", "2", "--rate", "0"], "--rate must be a positive number"),
        (["--random-models", "2", "--registry-gbps", "-1"], "--registry-gbps must be a positive number"),
    ):
        result = runner.invoke(app, ["bench", "cluster", *args])
        assert result.exit_code == 1, result.output
        assert message in result.output
