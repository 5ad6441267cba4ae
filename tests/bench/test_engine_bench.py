"""`ember bench engine` runs end to end at a tiny size (so it cannot rot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ember.cli import app
from ember.env import omp_wait_policy_set_by_ember
from ember.store.local import LocalStore

pytestmark = pytest.mark.timeout(240)


@pytest.mark.slow  # a whole benchmark run: a memory-bandwidth probe, transformers' model beside ours
def test_bench_engine_reports_every_figure(tiny_llama: tuple[Path, Any], ember_home: Path) -> None:
    import shutil

    store = LocalStore()
    shutil.copytree(tiny_llama[0], store.path_for("tiny"))
    store.register("tiny")
    result = CliRunner().invoke(
        app,
        ["bench", "engine", "tiny", "--batches", "1,2", "--prompt-len", "16", "--rounds", "1",
         "--background-load", "1", "--e2e-batches", "1,2", "--e2e-prompt-len", "4",
         "--e2e-new-tokens", "2", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [r["case"] for r in report["rows"]] == ["prefill 16", "decode b1", "decode b2"]
    assert all(r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0 for r in report["rows"])
    assert report["startup_from_dram_s"] > 0 and len(report["startup_samples_s"]) == 3
    assert report["floor_step_s"] > 0 and report["rss_bytes"] > 0
    assert report["device"] == "cpu" and report["floor_ratio"] > 0  # reported, no target on a CPU
    assert [t["name"] for t in report["targets"]] == [
        "prefill 16: ours / transformers tokens/s", "decode b1: ours / transformers tokens/s",
        "decode b2: ours / transformers tokens/s", "resident / (weights + KV budget + 300 MB)",
        "generate b1: LLM.generate / transformers generate tokens/s",
        "generate b2: LLM.generate / transformers generate tokens/s",
    ]  # fmt: skip
    # end to end: each side in its own worker, Ember's iterations split into parts
    assert [r["case"] for r in report["e2e_rows"]] == ["generate b1", "generate b2"]
    for r in report["e2e_rows"]:
        assert r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0 and r["step_parts"]["iterations"] == 2
    # beside one busy process: Ember's settings and torch's, each in its own worker process
    assert [r["case"] for r in report["load_rows"]] == ["decode b1", "decode b8"]
    for r in report["load_rows"]:
        assert r["background_load"] == 1 and r["ember_threads"] >= 1 and r["torch_threads"] >= 1
        assert r["ember_tok_s"] > 0 and r["torch_tok_s"] > 0
        if omp_wait_policy_set_by_ember():
            assert r["ember_wait"] == "OMP_WAIT_POLICY=PASSIVE" and r["torch_wait"].startswith("unset")


@pytest.mark.parametrize("flag", ["--e2e-batches", "--batches"])
def test_bench_engine_refuses_bad_batch_sizes(flag: str, ember_home: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "engine", "tiny", flag, "1,x"])
    assert result.exit_code == 1
    assert f"{flag}: expected positive integers separated by commas, got '1,x'" in result.stderr
