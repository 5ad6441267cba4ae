"""OutputLengths: a prior before any job, the true distribution from finished and
censored jobs, a new workload once it changes; persisted under EMBER_HOME."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ember.engine.output_lengths import OutputLengths, geometric_edges, lengths_path
from ember.engine.prefill_profile import profile_path


def true_survival(sizes: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """P(length >= e) at every edge, from the sizes themselves."""
    return np.array([(sizes >= e).mean() for e in edges])


def heavy_sizes(n: int, seed: int = 0) -> np.ndarray:
    """Four in five 4-24 tokens, one in five 160-320 (the issue's heavy-tailed mix)."""
    rng = np.random.default_rng(seed)
    long = rng.random(n) < 0.2
    return np.where(long, rng.integers(160, 321, n), rng.integers(4, 25, n))


def test_the_bins_are_geometric_up_to_the_cap() -> None:
    edges = geometric_edges()
    assert edges[0] == 1 and edges[-1] == 32769 and len(edges) == 51
    assert (np.diff(edges) >= 1).all() and np.diff(edges)[-1] > 1000
    lengths = OutputLengths.prior()
    assert lengths.bin_of(1) == 0 and lengths.bin_of(32768) == lengths.bin_of(10**6) == 49


def test_before_any_job_the_prior_is_geometric_with_mean_128() -> None:
    lengths = OutputLengths.prior()
    stay, inside = lengths.bins()
    w = lengths.widths
    assert stay == pytest.approx((127 / 128) ** w)
    assert inside == pytest.approx(128 * (1 - (127 / 128) ** w))
    assert lengths.mean() == pytest.approx(128, rel=1e-6)
    assert lengths.survival()[:3] == pytest.approx([1, 127 / 128, (127 / 128) ** 2])


def test_the_learnt_survival_converges_on_the_true_one() -> None:
    sizes = heavy_sizes(4000)
    lengths = OutputLengths.prior(decay=0.0)
    for s in sizes:
        lengths.observe(int(s))
    edges = lengths.edges
    assert lengths.survival()[:-1] == pytest.approx(true_survival(sizes, edges[:-1]), abs=0.02)
    assert lengths.mean() == pytest.approx(sizes.mean(), rel=0.03)


def test_censored_jobs_keep_the_long_ones_counted() -> None:
    """Jobs seen while still running (aborted, or running now) count as lengths of at
    least what they generated: the estimate stays right; dropping them would not."""
    sizes = heavy_sizes(4000, seed=1)
    cut = np.random.default_rng(2).integers(1, 200, len(sizes))  # when each was seen
    censored = OutputLengths.prior(decay=0.0)
    dropped = OutputLengths.prior(decay=0.0)
    for s, c in zip(sizes.tolist(), cut.tolist(), strict=True):
        censored.observe(min(s, c), finished=s <= c)
        if s <= c:
            dropped.observe(s)
    truth = true_survival(sizes, censored.edges[:-1])
    k = censored.bin_of(100)  # a length only long jobs pass
    assert censored.survival()[k] == pytest.approx(truth[k], abs=0.03)
    assert dropped.survival()[k] < truth[k] / 3  # the long ones missing: biased short


def test_running_jobs_count_as_censored_without_being_kept() -> None:
    lengths = OutputLengths.prior()
    for _ in range(50):
        lengths.observe(10)
    before = lengths.survival()
    during = lengths.survival(running=[300] * 50)  # 50 jobs already past 300 tokens
    k = lengths.bin_of(11)
    assert before[k] < 0.1 < 0.4 < during[k] < 0.6  # about half the jobs pass 10 tokens
    assert during[lengths.bin_of(300)] > 0.4
    assert lengths.survival() == pytest.approx(before)  # nothing kept


def test_a_new_workload_replaces_the_old_within_a_few_hundred_jobs() -> None:
    lengths = OutputLengths.prior()
    for _ in range(1000):
        lengths.observe(300)
    assert lengths.mean() == pytest.approx(300, rel=0.05)
    for _ in range(1000):
        lengths.observe(20)
    # what is left of the old jobs (0.995^1000 of their weight) and the prior: a thin tail
    assert lengths.mean() == pytest.approx(20, rel=0.25)
    assert lengths.survival()[lengths.bin_of(20) + 1] < 0.05  # P(length >= 23)


def test_past_the_longest_job_seen_the_estimate_continues_at_the_datas_rate() -> None:
    lengths = OutputLengths.prior()
    for i in range(300):
        lengths.observe(10 + i % 21)  # 10-30 tokens, mean 20
    assert 20 < lengths.prior_mean_now() < 25  # the prior's 4 pseudo-jobs of 128 are outweighed
    stay, _ = lengths.bins()
    k = lengths.bin_of(1000)  # no job got there
    per_token = 1 - stay[k] ** (1 / lengths.widths[k])
    assert per_token == pytest.approx(1 / lengths.prior_mean_now(), rel=1e-6)


def test_an_abort_before_any_output_teaches_nothing() -> None:
    lengths = OutputLengths.prior()
    lengths.observe(0, finished=False)
    assert lengths.count == 0 and lengths.version == 0


def test_the_lengths_are_saved_beside_the_profile_and_reloaded() -> None:
    path = lengths_path("tiny-abc", "cpu", "float32")
    assert path.parent == profile_path("tiny-abc", "cpu", "float32").parent
    lengths = OutputLengths.for_model("tiny-abc", "cpu", "float32")
    for s in heavy_sizes(300):
        lengths.observe(int(s))
    lengths.save()
    again = OutputLengths.for_model("tiny-abc", "cpu", "float32")
    assert again.survival() == pytest.approx(lengths.survival()) and again.count == 300
    assert OutputLengths.for_model("tiny-abc", "cpu", "bfloat16").count == 0  # per dtype
    assert not list(path.parent.glob("*.tmp*"))  # written through a temporary file, renamed


def test_the_lengths_are_saved_every_so_often_without_being_asked() -> None:
    path = lengths_path("tiny-abc", "cpu", "float32")
    lengths = OutputLengths.for_model("tiny-abc", "cpu", "float32")
    for _ in range(lengths.save_every):
        lengths.observe(7)
    assert OutputLengths(path).count == lengths.save_every


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"version": 1, "edges": [1, 2], "reached": [1], "deaths": [0], "tail": [0], "count": 1}',
        "[1, 2, 3]",
        '{"version": 1, "edges": EDGES, "reached": [1], "deaths": [0], "tail": [0], "count": 1}',
        '{"version": 1, "edges": EDGES, "reached": NEG, "deaths": NEG, "tail": NEG, "count": 1}',
    ],
    ids=["not-json", "other-bins", "not-an-object", "wrong-shape", "negative"],
)
def test_a_damaged_file_falls_back_to_the_prior_with_a_warning(
    content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = lengths_path("broken", "cpu", "float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content.replace("EDGES", str(geometric_edges().tolist())).replace("NEG", str([-1] * 50)))
    with caplog.at_level(logging.WARNING, logger="ember.engine.output_lengths"):
        lengths = OutputLengths(path)
    assert lengths.count == 0 and lengths.mean() == pytest.approx(128)
    assert "starting from the prior" in caplog.text


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="edges"):
        OutputLengths(edges=[2, 5])
    with pytest.raises(ValueError, match="prior"):
        OutputLengths(prior_mean=0.5)
