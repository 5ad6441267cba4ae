"""OutputLengths: the distribution of a model's output lengths, learnt online from its own jobs.

The Gittins policy ranks a job by how likely it is to finish soon given the tokens it
has already generated, so the instance needs the distribution of output lengths
(tokens, 1..cap) on its own workload. It is kept as a life table over ~50 geometric
bins (bin k: lengths [e_k, e_{k+1})), per bin the weighted counts of

    reached_k   jobs known to have generated token e_k (at risk in the bin)
    deaths_k    jobs that ended in the bin
    tail_k      tokens generated in the bin by the jobs that ended in it

so that P(pass bin k | reach it) = 1 - deaths_k / reached_k and the expected tokens
generated in the bin follow without assuming a shape inside it. A job seen while it
still runs (aborted, or running now) with `a` tokens generated is a censored
observation, as in Kaplan-Meier: it counts as reaching every bin it passed, and as the
fraction of its current bin it covered (the actuarial life table), and never as a
death, so long jobs that have not finished yet are not missing from the estimate.

A prior of `prior_weight` pseudo-jobs of a geometric length is added to the counts: it
sets the estimate before any job finished (mean `prior_mean`), and in the bins the data
has not reached. Its mean follows the finished jobs' (weighted with its own), so past
the longest job seen so far the estimate continues at the rate the data shows: with a
fixed 128, a job longer than every finished one would look like the start of a long
tail (when jobs are shorter) and rank last however alike the lengths are. Observed
counts decay by `decay` per new observation, so the last ~1/decay jobs dominate and a
change of workload shows. The counts are saved as JSON
beside the prefill profile (EMBER_HOME/profiles/, per model, device and dtype) every
`save_every` observations; an unreadable file falls back to the prior with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ember.engine.persist import save_json_atomic
from ember.engine.prefill_profile import profile_path

log = logging.getLogger(__name__)

_VERSION = 1
_FIELDS = ("reached", "deaths", "tail")
DEFAULT_CAP = 32768  # longest length the bins tell apart (tokens); longer counts as the cap
DEFAULT_NUM_BINS = 50


def geometric_edges(cap: int = DEFAULT_CAP, num_bins: int = DEFAULT_NUM_BINS) -> np.ndarray:
    """Bin edges e_0 = 1 < e_1 < ... < e_B = cap + 1: bin k holds lengths [e_k, e_{k+1}).
    Geometric, with the first bins one token wide where rounding would merge them."""
    edges = [1]
    for x in np.geomspace(1, cap + 1, num_bins + 1)[1:]:
        edges.append(max(round(float(x)), edges[-1] + 1))
    return np.array([e for e in edges if e < cap + 1] + [cap + 1], dtype=np.int64)


def lengths_path(model_key: str, device: str, dtype: str) -> Path:
    """Where the output lengths of this model, device and dtype live: beside its profile."""
    return profile_path(model_key, device, dtype).with_suffix(".lengths.json")


class OutputLengths:
    """A learnt distribution of output lengths. `path` None: kept in memory only."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        edges: Sequence[int] | np.ndarray | None = None,
        prior_mean: float = 128.0,
        prior_weight: float = 4.0,
        decay: float = 1 / 200,
        save_every: int = 50,
    ) -> None:
        self.path = path
        self.edges = np.asarray(geometric_edges() if edges is None else edges, dtype=np.int64)
        self.widths = np.diff(self.edges)  # tokens per bin
        if self.edges.ndim != 1 or len(self.widths) < 1 or self.edges[0] != 1 or (self.widths <= 0).any():
            raise ValueError(f"edges must rise from 1: {self.edges!r}")
        if not prior_mean >= 1 or not prior_weight > 0 or not 0 <= decay < 1:
            raise ValueError(f"bad prior or decay: {prior_mean=}, {prior_weight=}, {decay=}")
        self.prior_mean = prior_mean
        self.decay = decay
        self.save_every = save_every
        self.prior_weight = prior_weight
        self.counts = np.zeros((3, len(self.widths)))  # observed, decayed; rows as _FIELDS
        self.count = 0  # observations seen (finished or censored), undecayed
        self.version = 0  # changes with every observation: an index computed before is stale
        self._since_save = 0
        if path is not None and path.is_file():
            self._load(path)

    @classmethod
    def prior(cls, **options: object) -> OutputLengths:
        """The prior alone, in memory: learns, never reads or writes a file."""
        return cls(None, **options)  # type: ignore[arg-type]

    @classmethod
    def for_model(cls, model_key: str, device: str, dtype: str) -> OutputLengths:
        return cls(lengths_path(model_key, device, dtype))

    @property
    def cap(self) -> int:
        return int(self.edges[-1]) - 1

    @property
    def num_bins(self) -> int:
        return len(self.widths)

    def bin_of(self, length: int) -> int:
        """The bin holding `length` (lengths past the cap fall in the last)."""
        return int(np.searchsorted(self.edges, min(max(length, 1), self.cap), side="right")) - 1

    # -- observations ---------------------------------------------------------------

    def _covered(self, generated: np.ndarray) -> np.ndarray:
        """[jobs, B]: the fraction of each bin that jobs still running have generated."""
        g = np.minimum(generated, self.cap)[:, None]
        covered: np.ndarray = np.clip((g + 1 - self.edges[None, :-1]) / self.widths[None, :], 0.0, 1.0)
        return covered

    def observe(self, length: int, *, finished: bool = True) -> None:
        """A job left with `length` output tokens: its full length if it finished, a
        lower bound (censored) if it was aborted."""
        if length <= 0 and not finished:
            return  # an abort before any output says nothing about lengths
        self.counts *= 1.0 - self.decay
        if finished:
            n = min(max(length, 1), self.cap)
            k = self.bin_of(n)
            self.counts[0, : k + 1] += 1.0
            self.counts[1, k] += 1.0
            self.counts[2, k] += n - self.edges[k] + 1
        else:
            self.counts[0] += self._covered(np.array([length]))[0]
        self.count += 1
        self.version += 1
        self._since_save += 1
        if self.path is not None and self._since_save >= self.save_every:
            self.save()

    def bins(self, running: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Per bin, P(pass it | reach it) and E[tokens generated in it | reach it].
        `running`: tokens generated by the jobs still running, counted as censored
        observations (weight 1 each, not kept)."""
        mean = self.prior_mean_now()
        reached, deaths, tail = self._geometric(mean, self.prior_weight) + self.counts
        g = np.fromiter(running, dtype=np.int64)
        if len(g):
            reached = reached + self._covered(g).sum(axis=0)
        p = 1.0 / mean  # bins where even the prior underflows: the prior's own values
        known = reached > 1e-200
        at_risk = np.where(known, reached, 1.0)
        stay = np.where(known, np.clip(1.0 - deaths / at_risk, 0.0, 1.0), np.power(1.0 - p, self.widths))
        inside = np.where(
            known, stay * self.widths + tail / at_risk, -np.expm1(self.widths * np.log1p(-p)) / p
        )
        return stay, np.minimum(inside, self.widths)

    def prior_mean_now(self) -> float:
        """The prior's mean: prior_mean and the finished jobs' lengths, weighted by count."""
        deaths, tail = self.counts[1], self.counts[2]
        total = float((deaths * (self.edges[:-1] - 1) + tail).sum())  # sum of finished lengths
        return max(
            1.0, (self.prior_weight * self.prior_mean + total) / (self.prior_weight + float(deaths.sum()))
        )

    def survival(self, running: Iterable[int] = ()) -> np.ndarray:
        """P(length >= e_k) for every edge (the last: past the cap, 0)."""
        stay, _ = self.bins(running)
        out: np.ndarray = np.concatenate([[1.0], np.cumprod(stay)])
        out[-1] = 0.0
        return out

    def mean(self) -> float:
        """The expected output length (tokens) under the current estimate."""
        _, inside = self.bins()
        return float((self.survival()[:-1] * inside).sum())

    def _geometric(self, mean: float, weight: float) -> np.ndarray:
        """The counts of `weight` jobs of a geometric length with this mean."""
        p = 1.0 / mean
        if p >= 1.0:  # every job is one token long
            first = weight * (np.arange(self.num_bins) == 0)
            return np.stack([first, first, first])
        q = 1.0 - p
        w = self.widths.astype(float)
        reach = weight * np.power(q, self.edges[:-1] - 1.0)  # may underflow to 0 far out
        end = -np.expm1(w * np.log1p(-p))  # P(end in the bin | reach it)
        # E[tokens in the bin; end in it | reach it] = sum_{m=1..w} m p q^(m-1)
        tail = (1.0 - np.power(q, w) * (1.0 + w * p)) / p
        return np.stack([reach, reach * end, reach * tail])

    # -- persistence ----------------------------------------------------------------

    def save(self) -> None:
        """Write the counts to `path` (atomically); failures are logged, never raised."""
        if self.path is None:
            return
        self._since_save = 0
        data = {"version": _VERSION, "edges": self.edges.tolist(), "count": self.count}
        data.update({name: row.tolist() for name, row in zip(_FIELDS, self.counts, strict=True)})
        save_json_atomic(self.path, data, "output lengths")

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != _VERSION or data.get("edges") != self.edges.tolist():
                raise ValueError("written with other bins or by another version")
            counts = np.array([data[name] for name in _FIELDS], dtype=float)
            if counts.shape != self.counts.shape:
                raise ValueError("counts of the wrong shape")
            if not np.isfinite(counts).all() or (counts < 0).any():
                raise ValueError("counts that are negative or not finite")
            count = int(data.get("count", 0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring the unreadable output lengths %s, starting from the prior: %s", path, e)
            return
        self.counts, self.count = counts, count
