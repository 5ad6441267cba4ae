"""Trace reading and scaling."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ember.bench.workload import (
    TraceRequest,
    mean_rate,
    read_trace,
    synthetic_prompt,
    with_arrivals,
    with_length_scales,
    with_rate_scale,
)
from ember.errors import InvalidRequestError

DATA = Path(__file__).resolve().parents[2] / "data"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_first_n_rows_scaled_in_length_and_rate(tmp_path: Path) -> None:
    path = write(tmp_path, "arrived_at,num_prefill_tokens,num_decode_tokens\n10,100,40\n12,3,2\n16,50,1000\n")
    got = read_trace(path, num_requests=2, length_scale=0.1, rate_scale=2.0)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in got] == [(0.0, 10, 4), (1.0, 1, 1)]
    capped = read_trace(path, max_total_tokens=64)
    assert all(r.prompt_tokens + r.output_tokens <= 64 for r in capped)
    assert mean_rate(with_rate_scale(got, 4.0)) == pytest.approx(4.0)


def test_bad_traces_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="lacks the columns"):
        read_trace(write(tmp_path, "a,b\n1,2\n"))
    with pytest.raises(InvalidRequestError, match="no trace"):
        read_trace(tmp_path / "missing.csv")
    with pytest.raises(InvalidRequestError, match="not numbers"):
        read_trace(write(tmp_path, "arrived_at,num_prefill_tokens,num_decode_tokens\nx,1,1\n"))


@pytest.mark.parametrize("name", ["azure_llm_2023_conv.csv", "azure_llm_2023_code.csv"])
def test_the_shipped_azure_traces_read(name: str) -> None:
    """The traces the README's benchmark commands replay ship in the repository's data/."""
    got = read_trace(DATA / name, num_requests=50, length_scale=0.1)
    assert len(got) == 50 and got[0].arrival_s == 0.0
    assert all(b.arrival_s >= a.arrival_s for a, b in itertools.pairwise(got))
    assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in got)


def test_synthetic_prompts_are_reproducible_and_distinct() -> None:
    assert synthetic_prompt(3, 20, 1000) == synthetic_prompt(3, 20, 1000)
    assert synthetic_prompt(3, 20, 1000) != synthetic_prompt(4, 20, 1000)
    assert all(100 <= t < 1000 for t in synthetic_prompt(5, 50, 1000))


def test_prompt_and_output_lengths_scale_apart() -> None:
    reqs = [TraceRequest(0.0, 2000, 4), TraceRequest(1.0, 30, 300)]
    got = with_length_scales(reqs, 0.1, 1.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in got] == [(200, 4), (3, 300)]
    assert [r.prompt_tokens for r in with_length_scales(reqs, 0.001, 1.0)] == [2, 1]  # at least 1 token
    assert [r.arrival_s for r in with_arrivals(got, [5.0, 6.0])] == [5.0, 6.0]
    with pytest.raises(InvalidRequestError):
        with_length_scales(reqs, 0.0, 1.0)
