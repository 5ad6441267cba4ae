"""CostModel: one engine iteration's wall time predicted from the batch it computes.

    seconds = a                                  per iteration (scheduling, launch, sampling setup)
            + b * tokens                         every token computed (the weights' matmuls)
            + c * prefill pairs / 1e6            sum of q * (context + q) over prefill chunks (q > 1)
            + d * sequences                      per sequence in the batch (sampling, block tables)
            + e * decode KV reads / 1e3          sum of context + 1 over decodes (q == 1)

plus, for KV swapping, bytes moved / `swap_bytes_per_s`. The coefficients are fitted
by least squares with every cost non-negative (ember.engine.nnls) to iterations timed
on the real engine (ember.bench.sched_calibrate); the replay of the schedulers
(ember.bench.sched_replay) advances its virtual clock by these predictions. The model
also records what it was fitted on (the model's KV bytes per token, vocabulary and
positions), so a replay sizes its KV blocks like the real engine.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ember.engine.nnls import nonnegative_lstsq
from ember.errors import InvalidRequestError

FEATURES = ("iteration", "tokens", "prefill_pairs_m", "sequences", "decode_kv_reads_k")
_VERSION = 1


def features(query_lens: Sequence[int], context_lens: Sequence[int]) -> tuple[float, ...]:
    """The model's features of one batch: per sequence its new tokens and cached tokens."""
    tokens = pairs = reads = 0
    for q, c in zip(query_lens, context_lens, strict=True):
        tokens += q
        if q > 1:
            pairs += q * (c + q)
        else:
            reads += c + 1
    return (1.0, float(tokens), pairs / 1e6, float(len(query_lens)), reads / 1e3)


@dataclass(frozen=True)
class IterationSample:
    """One timed iteration: per sequence its new tokens and cached tokens; seconds."""

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class FitError:
    """Relative error |predicted - measured| / measured on held-out iterations."""

    median: float
    p90: float
    samples: int


@dataclass(frozen=True)
class CostModel:
    coef: tuple[float, ...]  # seconds per unit of each of FEATURES
    swap_bytes_per_s: float  # host <-> device KV copies
    kv_bytes_per_token: int  # of the model fitted on (K and V, every layer)
    vocab_size: int = 49152
    max_position_embeddings: int = 8192
    model: str = ""  # what it was fitted on, for the record
    fit_error: FitError | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.coef) != len(FEATURES) or any(c < 0 for c in self.coef):
            raise InvalidRequestError(f"a cost model has {len(FEATURES)} non-negative coefficients")
        if self.swap_bytes_per_s <= 0 or self.kv_bytes_per_token <= 0:
            raise InvalidRequestError("swap bandwidth and KV bytes per token must be positive")

    def iteration_s(self, query_lens: Sequence[int], context_lens: Sequence[int]) -> float:
        """Predicted seconds of one iteration computing this batch."""
        x = features(query_lens, context_lens)
        return sum(c * v for c, v in zip(self.coef, x, strict=True))

    def swap_s(self, num_bytes: int) -> float:
        """Seconds to copy num_bytes of KV blocks between device and host."""
        return num_bytes / self.swap_bytes_per_s

    # -- fitting --------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        samples: Sequence[IterationSample],
        *,
        swap_bytes_per_s: float,
        kv_bytes_per_token: int,
        relative: bool = True,
        **kw: Any,
    ) -> CostModel:
        """Least squares, every coefficient >= 0, over the samples' seconds. `relative`:
        iterations are weighted by 1 / seconds, so the fit minimises relative error (a
        20 ms decode counts as much as a 2 s prefill); else plain least squares, whose
        predictions sum to the measured total over the samples (what a completion time
        adds up) when iteration times are noisy with a slow tail."""
        if not samples:
            raise InvalidRequestError("no timed iterations to fit a cost model to")
        x = np.array([features(s.query_lens, s.context_lens) for s in samples])
        y = np.array([s.seconds for s in samples])
        w = 1.0 / np.maximum(y, 1e-6) if relative else np.ones_like(y)
        xw, yw = x * w[:, None], y * w
        coef = nonnegative_lstsq(xw.T @ xw, xw.T @ yw)
        return cls(
            tuple(float(max(0.0, c)) for c in coef),
            swap_bytes_per_s=swap_bytes_per_s,
            kv_bytes_per_token=kv_bytes_per_token,
            **kw,
        )

    def errors(self, samples: Sequence[IterationSample]) -> FitError:
        """Its relative error on these (held-out) iterations."""
        rel = sorted(
            abs(self.iteration_s(s.query_lens, s.context_lens) - s.seconds) / s.seconds for s in samples
        )
        if not rel:
            return FitError(float("nan"), float("nan"), 0)
        p90 = rel[min(len(rel) - 1, round(0.9 * (len(rel) - 1)))]
        return FitError(statistics.median(rel), p90, len(rel))

    # -- JSON -----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["coef"] = dict(zip(FEATURES, self.coef, strict=True))
        data["version"] = _VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostModel:
        try:
            if data.get("version") != _VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {_VERSION}")
            coef = tuple(float(data["coef"][name]) for name in FEATURES)
            err = data.get("fit_error")
            return cls(
                coef,
                swap_bytes_per_s=float(data["swap_bytes_per_s"]),
                kv_bytes_per_token=int(data["kv_bytes_per_token"]),
                vocab_size=int(data.get("vocab_size", 49152)),
                max_position_embeddings=int(data.get("max_position_embeddings", 8192)),
                model=str(data.get("model", "")),
                fit_error=FitError(**err) if err else None,
                notes=dict(data.get("notes", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidRequestError(f"not a cost model: {e}", param="cost") from e

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        """The model saved at `path`; InvalidRequestError if missing or malformed."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise InvalidRequestError(f"no cost model at {path}", param="cost") from e
        except (OSError, ValueError) as e:
            raise InvalidRequestError(f"cannot read the cost model {path}: {e}", param="cost") from e
        if not isinstance(data, dict):
            raise InvalidRequestError(f"{path} is not a cost model", param="cost")
        return cls.from_json(data)
