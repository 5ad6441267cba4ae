"""`ember bench cold` on the tiny random Llama: a short real run, checked for shape
and for each tier row really coming from its tier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ember.bench.cold import BASELINE, TIERS, BenchModel, ColdBenchConfig, run_cold_bench

pytestmark = pytest.mark.slow  # a server, a registry in a child process, transformers' baseline


@pytest.fixture(scope="module")
def cold_report(tiny_llama: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path, _ = tiny_llama
    work = tmp_path_factory.mktemp("cold-bench")
    cfg = ColdBenchConfig(
        repeats=1, max_tokens=3, warm_requests=1, keep_alive_s=0.2, engine_options={"kv_cache_bytes": 4 << 20}
    )
    return run_cold_bench([BenchModel("tiny", path)], work, cfg).to_json()


@pytest.mark.timeout(120)
def test_every_tier_row_is_present_and_positive(cold_report: dict[str, Any]) -> None:
    (model,) = cold_report["models"]
    assert model["model"] == "tiny" and model["nbytes"] > 0 and model["dtype"] == "float64"
    rows = {r["tier"]: r for r in model["rows"]}
    assert list(rows) == [*TIERS, BASELINE]
    for row in rows.values():
        assert row["cold_ttft_s"] > 0 and row["warm_ttft_s"] > 0 and row["load_s"] > 0
        assert len(row["samples"]) == cold_report["repeats"] == 1
        assert row["overhead_s"] == pytest.approx(row["cold_ttft_s"] - row["warm_ttft_s"])


@pytest.mark.timeout(120)
def test_each_row_loaded_from_its_tier(cold_report: dict[str, Any]) -> None:
    rows = {r["tier"]: r for r in cold_report["models"][0]["rows"]}
    for tier in TIERS:
        assert rows[tier]["observed_tiers"] == [tier]
    assert rows[BASELINE]["observed_tiers"] == ["safetensors"]
    assert rows[BASELINE]["samples"][0]["first_token_s"] > 0
    assert not [n for n in cold_report["notes"] if "loaded from" in n]


@pytest.mark.timeout(120)
def test_targets_compare_tiers_with_the_baseline(cold_report: dict[str, Any]) -> None:
    targets = {t["tier"]: t for t in cold_report["targets"]}
    assert {"dram", "disk", "registry", "wire RegistryServer"} <= set(targets)
    assert targets["dram"]["goal"] == pytest.approx(1 / 20) and targets["disk"]["goal"] == 0.5
    assert targets["registry"]["goal"] == 1.0
    wire = targets.pop("wire RegistryServer")
    assert wire["at_least"] and wire["goal"] == 0.9 and wire["met"] == (wire["ratio"] >= 0.9)
    targets.pop("wire nginx", None)
    rows = {r["tier"]: r for r in cold_report["models"][0]["rows"]}
    for tier, t in targets.items():
        assert t["ratio"] == pytest.approx(rows[tier]["overhead_s"] / rows[BASELINE]["overhead_s"])
        assert t["met"] == (t["ratio"] <= t["goal"])


@pytest.mark.timeout(120)
def test_the_wire_rows_compare_the_raw_limit_with_embers_download(cold_report: dict[str, Any]) -> None:
    (model,) = cold_report["models"]
    by_server: dict[str, set[str]] = {}
    for w in model["wire"]:
        assert w["median_s"] > 0 and len(w["samples_s"]) == cold_report["repeats"]
        by_server.setdefault(w["server"], set()).add(w["method"])
    assert "RegistryServer" in by_server
    for methods in by_server.values():
        assert methods >= {"ember into DRAM", "raw httpx t8 r32M", "raw into t4 r32M"}
    early, starts = model["first_token_before_last_byte"]
    assert starts == cold_report["repeats"] and 0 <= early <= starts
    registry = next(r for r in model["rows"] if r["tier"] == "registry")
    tail = registry["cold_ttft_s"] - registry["load_s"]  # one sample: the median is it
    assert model["first_token_after_last_byte_s"] == pytest.approx(tail)
    assert cold_report["registry_link_bps"] is None
