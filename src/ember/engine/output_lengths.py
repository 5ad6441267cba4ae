"""OutputLengths: the distribution of a model's output lengths, learnt online from its own jobs.

The Gittins policy ranks a job by how likely it is to finish soon given the tokens it
has already generated, so the instance needs the distribution of output lengths
(tokens, 1..cap) on its own workload. It is kept as a per-token hazard that is
constant within each of ~50 geometric bins: h_k = P(token t is the last | token t was
generated), t in bin k, estimated as

    h_k = deaths_k / exposure_k

where a finished job of length S adds one death in S's bin and one unit of exposure
for every token 1..S, and a job still running (or aborted) with a tokens generated adds
exposure for tokens 1..a and no death: a censored observation, as in Kaplan-Meier, so
the long jobs still running are not missing from the estimate. This is the maximum
likelihood fit of a piecewise-constant hazard, and a geometric length has the same
hazard in every bin.

A fixed prior of `prior_weight` pseudo-jobs of a geometric length with mean
`prior_mean` is added to the counts: it sets the estimate before any job finished, and
in bins no job has reached. Observed counts decay by `decay` per new observation, so the
last ~1/decay jobs dominate and a change of workload shows. The counts are saved as JSON
beside the prefill profile (EMBER_HOME/profiles/, per model, device and dtype) every
`save_every` observations; an unreadable file falls back to the prior with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ember.engine.prefill_profile import profile_path

log = logging.getLogger(__name__)

_VERSION = 1
DEFAULT_CAP = 32768  # longest length the bins tell apart (tokens); longer counts as the cap
DEFAULT_NUM_BINS = 50


def geometric_edges(cap: int = DEFAULT_CAP, num_bins: int = DEFAULT_NUM_BINS) -> np.ndarray:
    """Bin edges e_0 = 1 < e_1 < ... < e_B = cap + 1: bin k holds lengths [e_k, e_{k+1}).
    Geometric, with the first bins one token wide where rounding would merge them."""
    raw = np.geomspace(1, cap + 1, num_bins + 1)
    edges = [1]
    for x in raw[1:]:
        edges.append(max(round(float(x)), edges[-1] + 1))
    edges[-1] = cap + 1
    return np.array(sorted(set(e for e in edges if e <= cap + 1)), dtype=np.int64)


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
        self.decay = decay
        self.save_every = save_every
        if not prior_mean >= 1 or not prior_weight > 0 or not 0 <= decay < 1:
            raise ValueError(f"bad prior or decay: {prior_mean=}, {prior_weight=}, {decay=}")
        self.prior_mean = prior_mean
        self._prior_deaths, self._prior_exposure = self._geometric_counts(prior_mean, prior_weight)
        self.deaths = np.zeros(len(self.widths))  # decayed observed counts per bin
        self.exposure = np.zeros(len(self.widths))
        self.count = 0  # observations seen (finished or censored), undecayed
        self.version = 0  # changes with every observation: a cached index is stale
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
        k = int(np.searchsorted(self.edges, min(max(length, 1), self.cap), side="right")) - 1
        return k

    # -- observations ---------------------------------------------------------------

    def _exposure_of(self, generated: int) -> np.ndarray:
        """Tokens 1..generated at risk, per bin."""
        g = min(max(generated, 0), self.cap)
        return np.clip(g + 1 - self.edges[:-1], 0, self.widths).astype(float)

    def observe(self, length: int, *, finished: bool = True) -> None:
        """A job left with `length` output tokens: its full length if it finished, a
        lower bound (censored) if it was aborted."""
        if length <= 0 and not finished:
            return  # an abort before any output says nothing about lengths
        keep = 1.0 - self.decay
        self.deaths *= keep
        self.exposure *= keep
        self.exposure += self._exposure_of(length)
        if finished and length >= 1:
            self.deaths[self.bin_of(length)] += 1.0
        self.count += 1
        self.version += 1
        self._since_save += 1
        if self.path is not None and self._since_save >= self.save_every:
            self.save()

    def hazards(self, running: Iterable[int] = ()) -> np.ndarray:
        """Per-token hazard per bin; `running`: tokens generated by the jobs still
        running, counted as censored observations (weight 1, not kept)."""
        exposure = self._prior_exposure + self.exposure
        g = np.minimum(np.fromiter(running, dtype=np.int64), self.cap)  # [running jobs]
        if len(g):
            exposure = exposure + np.clip(g[:, None] + 1 - self.edges[None, :-1], 0, self.widths).sum(axis=0)
        deaths = self._prior_deaths + self.deaths
        safe = np.maximum(exposure, 1e-300)
        h = np.where(exposure > 0, deaths / safe, 1.0 / self.prior_mean)  # unreached: the prior's
        return np.clip(h, 0.0, 1.0 - 1e-12)

    def survival(self, running: Iterable[int] = ()) -> np.ndarray:
        """P(length >= e_k) for every edge (the last: past the cap, 0)."""
        h = self.hazards(running)
        log_pass = self.widths * np.log1p(-h)
        out: np.ndarray = np.exp(np.concatenate([[0.0], np.cumsum(log_pass)]))
        out[-1] = 0.0
        return out

    def mean(self) -> float:
        """The expected output length (tokens) under the current estimate."""
        h = self.hazards()
        surv = self.survival()[:-1]
        ratio = np.where(h > 0, -np.expm1(self.widths * np.log1p(-h)) / np.maximum(h, 1e-300), self.widths)
        return float((surv * ratio).sum())

    def _geometric_counts(self, mean: float, weight: float) -> tuple[np.ndarray, np.ndarray]:
        """Deaths and exposure per bin of `weight` jobs of a geometric length with this mean."""
        p = 1.0 / mean
        if p >= 1.0:  # every job is one token long
            first = weight * (np.arange(self.num_bins) == 0)
            return first, first.copy()
        start = np.power(1.0 - p, self.edges[:-1] - 1.0)  # P(length >= e_k); may underflow to 0
        leave = -np.expm1(self.widths * np.log1p(-p))  # P(ends in the bin | reached it)
        deaths = weight * start * leave
        exposure = weight * start * leave / p  # sum over the bin's tokens of P(length >= t)
        return deaths, exposure

    # -- persistence ----------------------------------------------------------------

    def save(self) -> None:
        """Write the counts to `path` (atomically); failures are logged, never raised."""
        if self.path is None:
            return
        self._since_save = 0
        data = {
            "version": _VERSION,
            "edges": self.edges.tolist(),
            "deaths": self.deaths.tolist(),
            "exposure": self.exposure.tolist(),
            "count": self.count,
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.path)
        except OSError as e:
            log.warning("could not save the output lengths %s: %s", self.path, e)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != _VERSION or data.get("edges") != self.edges.tolist():
                raise ValueError("written with other bins or by another version")
            deaths = np.array(data["deaths"], dtype=float)
            exposure = np.array(data["exposure"], dtype=float)
            shape = (self.num_bins,)
            if deaths.shape != shape or exposure.shape != shape:
                raise ValueError("counts of the wrong shape")
            if not (np.isfinite(deaths).all() and np.isfinite(exposure).all()):
                raise ValueError("counts that are not finite")
            if (deaths < 0).any() or (exposure < 0).any():
                raise ValueError("negative counts")
            count = int(data.get("count", 0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring the unreadable output lengths %s, starting from the prior: %s", path, e)
            return
        self.deaths, self.exposure, self.count = deaths, exposure, count
