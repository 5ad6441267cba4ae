"""MigrationCost: how long moving a running inference to another node takes.

Live migration moves tokens, not KV cache: the destination recomputes the KV cache
of prompt + output so far, so the cost is a * tokens + b. a and b are fitted by
least squares over the most recent measured recomputations (priors until two
distinct sizes were seen).
"""

from __future__ import annotations

import threading
from collections import deque

PRIOR_S_PER_TOKEN = 2e-4
PRIOR_FIXED_S = 0.05


class MigrationCost:
    """a * tokens + b seconds, calibrated from measured recomputation times."""

    def __init__(self, a: float = PRIOR_S_PER_TOKEN, b: float = PRIOR_FIXED_S, *, window: int = 64) -> None:
        self.a, self.b = a, b
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def seconds(self, tokens: int) -> float:
        """Expected seconds to hand over an inference of `tokens` tokens."""
        with self._lock:
            return max(0.0, self.a * tokens + self.b)

    def observe(self, tokens: int, seconds: float) -> None:
        """A measured recomputation of `tokens` tokens that took `seconds`."""
        with self._lock:
            self._samples.append((tokens, seconds))
            xs = [x for x, _ in self._samples]
            if len(set(xs)) < 2:
                return
            n = len(xs)
            mean_x = sum(xs) / n
            mean_y = sum(y for _, y in self._samples) / n
            var = sum((x - mean_x) ** 2 for x in xs)
            cov = sum((x - mean_x) * (y - mean_y) for x, y in self._samples)
            self.a = max(0.0, cov / var)
            self.b = max(0.0, mean_y - self.a * mean_x)
