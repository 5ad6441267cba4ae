"""Request traces: arrival time, prompt length and output length per request, read from
a CSV in the format of shared/data/*.csv (`arrived_at,num_prefill_tokens,num_decode_tokens`),
with the lengths and the arrival rate scaled to what the hardware at hand can serve."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ember.errors import InvalidRequestError, NotFoundError

_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives (seconds after the first request) and
    how many prompt and output tokens it has."""

    arrival_s: float
    input_len: int
    output_len: int


@dataclass(frozen=True)
class TraceScaling:
    """How a trace was scaled: lengths multiplied by `length_scale` (at least one token
    each), arrival times divided by `rate_scale` (so the rate is multiplied by it)."""

    length_scale: float = 1.0
    rate_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.length_scale > 0 or not self.rate_scale > 0:
            raise InvalidRequestError("--length-scale and --rate-scale must be positive")

    def length(self, n: int) -> int:
        return max(1, round(n * self.length_scale))


def read_trace(path: Path, num_requests: int, scaling: TraceScaling | None = None) -> list[TraceRequest]:
    """The first `num_requests` requests of the trace at `path`, scaled; arrival times
    start at 0 (the first request's own time is subtracted)."""
    scaling = scaling or TraceScaling()
    if num_requests < 1:
        raise InvalidRequestError("the number of requests must be at least 1")
    if not path.is_file():
        raise NotFoundError(f"no trace file at {path}")
    rows: list[tuple[float, int, int]] = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InvalidRequestError(f"{path}: the trace has no column {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            if len(rows) == num_requests:
                break
            try:
                rows.append(
                    (float(row["arrived_at"]), int(row["num_prefill_tokens"]), int(row["num_decode_tokens"]))
                )
            except (TypeError, ValueError) as exc:
                raise InvalidRequestError(f"{path}:{line}: not a trace row ({exc})") from exc
    if not rows:
        raise InvalidRequestError(f"{path}: the trace has no requests")
    start = rows[0][0]
    return [
        TraceRequest(
            arrival_s=(at - start) / scaling.rate_scale,
            input_len=scaling.length(prefill),
            output_len=scaling.length(decode),
        )
        for at, prefill, decode in rows
    ]
