"""Request arrival times for benchmarks: a gamma process, as vLLM's serving benchmark
draws them, shared by `ember bench serve`, `ember bench sched` and the cluster benches.

Intervals are gamma-distributed with shape `burstiness` and mean 1/`rate`: burstiness 1
is a Poisson process, lower is burstier (the intervals' coefficient of variation is
1/sqrt(burstiness)), higher is more regular. Scaling the times of a rate-1 process by
1/rate gives the same process at `rate` (the gamma scale property), so one seeded draw
serves every load of a sweep: the loads differ only in speed, not in pattern.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from ember.errors import InvalidRequestError


def check_arrival_params(rate: float, burstiness: float) -> None:
    """InvalidRequestError unless rate > 0 (inf: all at once) and burstiness > 0."""
    if not rate > 0:
        raise InvalidRequestError(
            f"--request-rate must be positive (inf: all at once), got {rate}", param="request_rate"
        )
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise InvalidRequestError(f"--burstiness must be positive, got {burstiness}", param="burstiness")


def gamma_arrivals(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Arrival times (s, the first at 0) of `n` requests from a gamma process with mean
    rate `rate` (requests/s) and shape `burstiness`. rate = inf sends everything at 0."""
    check_arrival_params(rate, burstiness)
    times, now = [], 0.0
    for _ in range(n):
        times.append(now)
        if not math.isinf(rate):
            now += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


def seeded_arrivals(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """gamma_arrivals from its own generator seeded with `seed`: the same times for the
    same arguments, whatever else draws random numbers."""
    return gamma_arrivals(n, rate, burstiness, random.Random(seed))


def at_rate(unit_times: Sequence[float], rate: float) -> list[float]:
    """Times of a rate-1 process moved to `rate` (requests/s; inf: all at 0)."""
    if not rate > 0:
        raise InvalidRequestError(f"a request rate must be positive, got {rate}", param="request_rate")
    return [0.0 if math.isinf(rate) else t / rate for t in unit_times]
