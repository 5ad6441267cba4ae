"""Cluster traces: the CSV round trip, clear errors for bad files, Zipf popularity and
determinism of the generated workload."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ember.bench import arrivals
from ember.bench.cluster_workload import (
    CLUSTER_COLUMNS,
    ClusterRequest,
    generate_cluster_workload,
    read_cluster_trace,
    write_cluster_trace,
    zipf_weights,
)
from ember.errors import InvalidRequestError

MODELS = ["a", "b", "c", "d"]


def test_round_trip(tmp_path: Path) -> None:
    reqs = [ClusterRequest(0.0, "a", 3, 4), ClusterRequest(0.1 + 0.2, "b,c", 1, 9)]
    path = tmp_path / "t.csv"
    write_cluster_trace(path, reqs)
    assert path.read_text().splitlines()[0] == ",".join(CLUSTER_COLUMNS)
    assert read_cluster_trace(path) == reqs
    assert read_cluster_trace(path, num_requests=1) == reqs[:1]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("arrived_at,num_prefill_tokens,num_decode_tokens\n0,1,1\n", "lacks the columns model"),
        (",".join(CLUSTER_COLUMNS) + "\n", "holds no requests"),
        (",".join(CLUSTER_COLUMNS) + "\n0,a,x,1\n", "line 2: a field is not a number"),
        (",".join(CLUSTER_COLUMNS) + "\n0,,1,1\n", "the model is empty"),
        (",".join(CLUSTER_COLUMNS) + "\n0,a,0,1\n", "lengths must be >= 1"),
        (",".join(CLUSTER_COLUMNS) + "\n0,a,1\n", "not a number"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(InvalidRequestError, match=match):
        read_cluster_trace(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="no trace at"):
        read_cluster_trace(tmp_path / "none.csv")


def test_zipf_weights() -> None:
    w = zipf_weights(3, 1.0)
    assert w == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    assert zipf_weights(4, 0.0) == pytest.approx([0.25] * 4)
    with pytest.raises(InvalidRequestError):
        zipf_weights(0, 1.0)
    with pytest.raises(InvalidRequestError):
        zipf_weights(3, -1.0)


def test_zipf_frequencies_converge() -> None:
    reqs = generate_cluster_workload(MODELS, requests=20_000, rate=10.0, zipf=1.2, seed=3)
    counts = Counter(r.model for r in reqs)
    for model, w in zip(MODELS, zipf_weights(len(MODELS), 1.2), strict=True):
        assert counts[model] / len(reqs) == pytest.approx(w, abs=0.015)


@pytest.mark.parametrize("kind", ["azure", "poisson", "gamma:0.5"])
def test_deterministic_per_seed(kind: str) -> None:
    one = generate_cluster_workload(MODELS, requests=300, rate=2.0, zipf=1.1, seed=7, arrivals=kind)
    two = generate_cluster_workload(MODELS, requests=300, rate=2.0, zipf=1.1, seed=7, arrivals=kind)
    other = generate_cluster_workload(MODELS, requests=300, rate=2.0, zipf=1.1, seed=8, arrivals=kind)
    assert one == two
    assert [r.model for r in one] != [r.model for r in other]
    times = [r.arrival_s for r in one]
    assert times == sorted(times) and times[0] == 0.0


def test_poisson_uses_the_shared_arrivals() -> None:
    reqs = generate_cluster_workload(MODELS, requests=50, rate=4.0, zipf=1.0, seed=5, arrivals="poisson")
    assert [r.arrival_s for r in reqs] == arrivals.seeded_arrivals(50, 4.0, 1.0, 5)


def test_azure_rate_and_cycling() -> None:
    n = 40_000  # longer than the 19,366-row trace: arrivals and lengths cycle
    reqs = generate_cluster_workload(MODELS, requests=n, rate=5.0, zipf=1.0, seed=1)
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    assert (n - 1) / span == pytest.approx(5.0, rel=0.01)
    times = [r.arrival_s for r in reqs]
    assert times == sorted(times)
    assert (reqs[0].prompt_tokens, reqs[0].output_tokens) == (374, 44)  # the trace's first row


def test_scales_and_bad_arguments() -> None:
    reqs = generate_cluster_workload(
        MODELS, requests=3, rate=1.0, zipf=1.0, seed=1, prompt_scale=0.5, output_scale=0.001
    )
    assert reqs[0].prompt_tokens == 187 and reqs[0].output_tokens == 1
    for kwargs in ({"requests": 0}, {"rate": 0.0}, {"arrivals": "uniform"}, {"arrivals": "gamma:x"}):
        args = {"requests": 3, "rate": 1.0, "zipf": 1.0, "seed": 1, **kwargs}
        with pytest.raises(InvalidRequestError):
            generate_cluster_workload(MODELS, **args)  # type: ignore[arg-type]
