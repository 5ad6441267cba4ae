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
    """Behind a link: the registry start runs at its rate, and the raw wire is skipped."""
    out = tmp_path / "results" / "cold.json"  # the folder is made as needed
    args = ["bench", "cold", "--models", str(tiny_llama[0]), "--repeats", "1", "--max-tokens", "2",
            "--keep-alive", "0.2", "--registry-gbps", "0.2", "--json", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for word in ("dram", "disk", "registry", "transformers", "targets"):
        assert word in result.output
    report = json.loads(out.read_text())
    (model,) = report["models"]
    assert [r["tier"] for r in model["rows"]] == ["registry", "dram", "disk", "transformers"]
    assert all(r["observed_tiers"] == [r["tier"]] for r in model["rows"][:3])
    assert [t["tier"] for t in report["targets"]] == ["dram", "disk", "registry"]
    assert report["registry_link_bps"] == 0.2e9 / 8 and model["wire"] == []
    assert "the registry sat behind a 0.2 Gb/s link: the wire was not measured" in report["notes"]
    registry = model["rows"][0]
    assert registry["load_s"] >= 0.5 * model["nbytes"] / report["registry_link_bps"]  # the link's pace
    tail = registry["cold_ttft_s"] - registry["load_s"]  # one sample: the median is it
    assert model["first_token_after_last_byte_s"] == pytest.approx(tail)


@pytest.mark.parametrize("gbps", ["0", "-1", "nan"])
def test_bench_cold_refuses_a_link_of_no_speed(gbps: str) -> None:
    result = CliRunner().invoke(app, ["bench", "cold", "--registry-gbps", gbps])
    assert result.exit_code != 0
    assert "--registry-gbps must be a positive number" in result.output


def test_bench_cold_needs_a_model() -> None:
    result = CliRunner().invoke(app, ["bench", "cold", "--models", " , "])
    assert result.exit_code != 0
    assert "at least one model" in result.output
