"""`ember bench engine`'s end-to-end part at a tiny size: LLM.generate and transformers'
generate, each in its own worker process, on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ember.bench.engine_e2e import prompts, run_e2e_case
from ember.bench.step_parts import PARTS
from ember.env import omp_wait_policy_set_by_ember


def test_both_sides_get_the_same_prompts() -> None:
    first, again = prompts(100, 3, 5), prompts(100, 2, 5)
    assert len(first) == 3 and all(len(p) == 5 and all(0 <= t < 100 for t in p) for p in first)
    assert again == first[:2]  # seeded: a batch's prompts are the larger batch's first ones


@pytest.mark.slow  # two worker processes, each importing torch and transformers
@pytest.mark.timeout(300)
def test_e2e_rows_time_both_sides_and_split_ember_iterations(tiny_llama: tuple[Path, Any]) -> None:
    rows = run_e2e_case(tiny_llama[0], batches=(1, 2), prompt_len=4, new_tokens=3, rounds=2)
    assert [r["case"] for r in rows] == ["generate b1", "generate b2"]
    for r in rows:
        assert len(r["ours_samples_s"]) == len(r["hf_samples_s"]) == 2
        assert r["ours_tok_s"] == pytest.approx(r["batch"] * 3 / r["ours_s"])
        assert r["speedup"] == pytest.approx(r["hf_s"] / r["ours_s"])
        parts = r["step_parts"]
        # the prefill iteration samples the first token; then one decode per further token
        assert parts["iterations"] == 3
        assert set(parts["seconds"]) == set(PARTS)
        assert parts["step_s"] == pytest.approx(sum(parts["seconds"].values()))
        assert parts["seconds"]["forward"] > 0 and 0 < parts["outside_forward_share"] < 1
        assert 0 <= r["outside_steps_s"] < r["ours_s"]
        assert r["ember_threads"] >= 1 and r["hf_threads"] >= 1
        if omp_wait_policy_set_by_ember():  # transformers runs with torch's defaults
            assert r["ember_wait"] == "OMP_WAIT_POLICY=PASSIVE" and r["hf_wait"].startswith("unset")
