"""`ember bench cold` once on the tiny random Llama: the table, the targets and the JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ember.cli import app


@pytest.mark.slow  # a server and a registry in a child process
@pytest.mark.timeout(180)
def test_bench_cold_prints_every_tier_and_writes_json(tiny_llama: tuple[Path, Any], tmp_path: Path) -> None:
    out = tmp_path / "results" / "cold.json"  # the folder is made as needed
    args = ["bench", "cold", "--models", str(tiny_llama[0]), "--repeats", "1", "--max-tokens", "2",
            "--keep-alive", "0.2", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for word in ("dram", "disk", "registry", "transformers", "targets"):
        assert word in result.output
    report = json.loads(out.read_text())
    (model,) = report["models"]
    assert [r["tier"] for r in model["rows"]] == ["registry", "dram", "disk", "transformers"]
    assert all(r["observed_tiers"] == [r["tier"]] for r in model["rows"][:3])
    tiers = [t["tier"] for t in report["targets"]]
    assert tiers[:3] == ["dram", "disk", "registry"]  # then the download against the raw limit, per server
    assert "wire RegistryServer" in tiers[3:] and all(t.startswith("wire ") for t in tiers[3:])
    methods = {w["method"] for w in model["wire"]}
    assert methods >= {"ember into DRAM", "raw httpx t8 r32M", "raw into t4 r32M"}


def test_bench_cold_needs_a_model() -> None:
    result = CliRunner().invoke(app, ["bench", "cold", "--models", " , "])
    assert result.exit_code != 0
    assert "at least one model" in result.output
