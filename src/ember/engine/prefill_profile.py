"""PrefillProfile: how long an iteration takes, learnt online from the instance's own iterations.

Skip-join MLFQ places a new job by its predicted prefill time, so the instance needs
the cost of a prefill of L tokens on this model, device and dtype. Nothing is measured
at start-up and no table is shipped: every iteration's measured time refines a
least-squares fit

    seconds ~ a + b * tokens + c * pairs

where `tokens` is the iteration's new tokens and `pairs` the query-key pairs its
attention computes (sum of q * (context + q)), so a prefill of L tokens costs
a + b L + c L^2. Older iterations decay, so the fit follows the machine's load. The fit
(its sufficient statistics) is saved as JSON under EMBER_HOME/profiles/ every so often,
and the next instance of the same model, device and dtype starts from it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ember.engine.nnls import nonnegative_lstsq
from ember.engine.persist import save_json_atomic
from ember.env import ember_home

log = logging.getLogger(__name__)

_SCALE = np.array([1.0, 1e-3, 1e-6])  # features in [1, thousands of tokens, millions of pairs]
_VERSION = 1


def profile_path(model_key: str, device: str, dtype: str) -> Path:
    """Where the profile of this model, device and dtype lives."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model_key}-{device}-{dtype}")
    return ember_home() / "profiles" / f"{name}.json"


class PrefillProfile:
    """An online model of iteration time. `path` None: kept in memory only.

    decay: weight kept by past iterations at each new one (0.998: the last ~500
        iterations dominate, a few minutes of serving, so a change in load shows soon).
    save_every: iterations between saves (a save is one small JSON write).
    """

    MIN_SAMPLES = 3

    def __init__(self, path: Path | None = None, *, decay: float = 0.998, save_every: int = 100) -> None:
        self.path = path
        self.decay = decay
        self.save_every = save_every
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)
        self._count = 0
        self._decode_s: float | None = None  # moving average of decode-only iterations
        self._coef: np.ndarray | None = None
        self._unit: tuple[np.ndarray, tuple[float, float, float]] | None = None  # _per_unit's cache
        self._since_save = 0
        if path is not None and path.is_file():
            self._load(path)

    @classmethod
    def for_model(cls, model_key: str, device: str, dtype: str) -> PrefillProfile:
        return cls(profile_path(model_key, device, dtype))

    def copy(self) -> PrefillProfile:
        """What this profile knows now, in memory only (its own updates are never saved):
        benchmark cases each start from the same warmed profile."""
        twin = PrefillProfile(decay=self.decay, save_every=self.save_every)
        twin._xtx, twin._xty = self._xtx.copy(), self._xty.copy()
        twin._count, twin._decode_s = self._count, self._decode_s
        return twin

    # -- measurements ---------------------------------------------------------------

    def observe(self, query_lens: Sequence[int], context_lens: Sequence[int], seconds: float) -> None:
        """Record one iteration: per sequence, its new tokens and cached tokens."""
        if not query_lens or seconds <= 0:
            return
        tokens = sum(query_lens)
        pairs = sum(q * (c + q) for q, c in zip(query_lens, context_lens, strict=True))
        x = np.array([1.0, tokens, pairs]) * _SCALE
        self._xtx = self.decay * self._xtx + np.outer(x, x)
        self._xty = self.decay * self._xty + x * seconds
        self._count += 1
        self._coef = None
        if all(q == 1 for q in query_lens):
            d = self._decode_s
            self._decode_s = seconds if d is None else 0.9 * d + 0.1 * seconds
        self._since_save += 1
        if self.path is not None and (self._since_save >= self.save_every or self._count == self.MIN_SAMPLES):
            self.save()

    @property
    def ready(self) -> bool:
        """Whether enough iterations were seen to predict."""
        return self._count >= self.MIN_SAMPLES

    # -- predictions ----------------------------------------------------------------

    def predict_prefill(self, num_tokens: int) -> float:
        """Seconds to prefill num_tokens alone (0.0 before any measurement)."""
        return self.predict_iteration([num_tokens], [0])

    def predict_iteration(self, query_lens: Sequence[int], context_lens: Sequence[int]) -> float:
        if not self.ready:
            return 0.0
        tokens = sum(query_lens)
        pairs = sum(q * (c + q) for q, c in zip(query_lens, context_lens, strict=True))
        a, b, c = self._per_unit()
        return max(0.0, a + b * tokens + c * pairs)  # plain floats: schedulers call it per job

    def _per_unit(self) -> tuple[float, float, float]:
        """The fit's seconds per iteration, per token and per pair."""
        coef = self._fit()
        if self._unit is None or self._unit[0] is not coef:
            a, b, c = (float(v) for v in coef * _SCALE)
            self._unit = (coef, (a, b, c))
        return self._unit[1]

    @property
    def decode_iteration_s(self) -> float | None:
        """The recent time of one decode-only iteration, None before one was seen."""
        return self._decode_s

    def _fit(self) -> np.ndarray:
        """Least squares with non-negative costs (the intercept may take any sign): too
        few distinct iterations to separate the terms must not give a negative cost."""
        if self._coef is None:
            self._coef = nonnegative_lstsq(self._xtx, self._xty, free=(0,))
        return self._coef

    # -- persistence ----------------------------------------------------------------

    def save(self) -> None:
        """Write the fit to `path` (atomically); failures are logged, never raised."""
        if self.path is None:
            return
        self._since_save = 0
        data = {
            "version": _VERSION,
            "xtx": self._xtx.tolist(),
            "xty": self._xty.tolist(),
            "count": self._count,
            "decode_s": self._decode_s,
        }
        save_json_atomic(self.path, data, "prefill profile")

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != _VERSION:
                return
            xtx, xty = np.array(data["xtx"], dtype=float), np.array(data["xty"], dtype=float)
            if xtx.shape != (3, 3) or xty.shape != (3,):
                return
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the unreadable prefill profile %s: %s", path, e)
            return
        self._xtx, self._xty = xtx, xty
        self._count = int(data.get("count", 0))
        decode = data.get("decode_s")
        self._decode_s = float(decode) if decode is not None else None
