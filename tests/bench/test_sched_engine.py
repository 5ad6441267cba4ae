"""The real-clock RunCase: every case's engine starts from the same copy of the
model's iteration-time profile and the prior of output lengths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ember.bench.sched_cases import Case
from ember.bench.sched_engine import EngineRunner


@pytest.mark.timeout(120)
def test_each_case_starts_from_the_same_profile_and_learns_nothing_into_the_next(
    tiny_llama: tuple[Path, Any],
) -> None:
    runner = EngineRunner.load(str(tiny_llama[0]), {"max_num_seqs": 2, "kv_cache_bytes": 12 * 16 * 1024})
    assert runner.profile is not None
    first = runner.build_case_engine(Case("fcfs", "fcfs"))
    try:
        assert first.profile.path is None and first.profile is not runner.profile
        for _ in range(30):
            first.profile.observe([64], [0], 9.0)  # a case that learns something odd
    finally:
        first.close()
    second = runner.build_case_engine(Case("mlfq", "mlfq"))
    try:
        assert second.profile.predict_prefill(64) < 1.0  # the odd spell stayed with its case
        assert second.lengths.path is None  # from the prior, in memory
    finally:
        second.close()
