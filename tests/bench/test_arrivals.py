"""The shared gamma arrivals helper: rate, burstiness, seeded determinism, scaling."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.bench.arrivals import at_rate, gamma_arrivals, seeded_arrivals
from ember.errors import InvalidRequestError


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_the_mean_rate_and_the_spread_of_gaps_follow_the_parameters(burstiness: float) -> None:
    times = seeded_arrivals(8001, rate=5.0, burstiness=burstiness, seed=1)
    gaps = _gaps(times)
    assert times[0] == 0.0 and times == sorted(times)
    assert 8000 / times[-1] == pytest.approx(5.0, rel=0.08)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.12)  # gamma: CV = 1/sqrt(shape)


def test_lower_burstiness_is_burstier() -> None:
    def cv(b: float) -> float:
        gaps = _gaps(seeded_arrivals(4001, 2.0, b, seed=3))
        return statistics.pstdev(gaps) / statistics.fmean(gaps)

    assert cv(0.2) > cv(1.0) > cv(5.0)


def test_the_same_seed_gives_the_same_times_and_another_seed_others() -> None:
    assert seeded_arrivals(50, 3.0, 0.5, seed=7) == seeded_arrivals(50, 3.0, 0.5, seed=7)
    assert seeded_arrivals(50, 3.0, 0.5, seed=7) != seeded_arrivals(50, 3.0, 0.5, seed=8)
    random.seed(123)  # the global generator plays no part
    a = seeded_arrivals(20, 1.0, 1.0, seed=0)
    random.seed(456)
    assert a == seeded_arrivals(20, 1.0, 1.0, seed=0)


def test_infinite_rate_sends_everything_at_once() -> None:
    assert gamma_arrivals(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]
    assert at_rate([0.0, 1.0, 2.5], math.inf) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(("rate", "burstiness"), [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (1.0, math.inf)])
def test_bad_parameters_are_clear_errors(rate: float, burstiness: float) -> None:
    with pytest.raises(InvalidRequestError, match="request-rate|burstiness"):
        gamma_arrivals(3, rate, burstiness, random.Random(0))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 60),
    rate=st.floats(0.05, 50.0),
    burstiness=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_a_unit_rate_draw_moved_to_a_rate_is_that_rates_draw(
    n: int, rate: float, burstiness: float, seed: int
) -> None:
    direct = seeded_arrivals(n, rate, burstiness, seed)
    moved = at_rate(seeded_arrivals(n, 1.0, burstiness, seed), rate)
    assert len(direct) == n and direct[0] == 0.0 and direct == sorted(direct)
    assert moved == pytest.approx(direct, rel=1e-9, abs=1e-12)
