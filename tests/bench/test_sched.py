"""Benchmark statistics."""

from __future__ import annotations

import pytest

from ember.bench.sched import RequestTiming, percentile


def test_percentiles_interpolate_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0


def test_request_timings() -> None:
    t = RequestTiming(arrival_s=1.0, first_token_s=1.5, finish_s=3.5, output_tokens=5)
    assert (t.jct, t.ttft, t.tpot) == (2.5, 0.5, 0.5)
    assert RequestTiming(0.0, 1.0, 1.0, 1).tpot is None
