"""Request traces for benchmarks: arrival times and prompt / output lengths, scaled.

A trace is a CSV with columns arrived_at (seconds), num_prefill_tokens and
num_decode_tokens, the form of the repository's data/azure_llm_2023_*.csv. Production
traces are sized for GPUs; `length_scale` shrinks both lengths and `rate_scale`
multiplies the arrival rate (divides the gaps), so a CPU can replay them.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.errors import InvalidRequestError

COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # from the first request of the (scaled) trace
    prompt_tokens: int
    output_tokens: int


def read_trace(
    path: str | Path,
    *,
    num_requests: int | None = None,
    length_scale: float = 1.0,
    rate_scale: float = 1.0,
    max_total_tokens: int | None = None,
) -> list[TraceRequest]:
    """The first `num_requests` rows of the trace, lengths times length_scale (at least
    1 token each), arrival gaps divided by rate_scale, times from the first arrival.
    `max_total_tokens` caps prompt + output (the prompt is cut first)."""
    if length_scale <= 0 or rate_scale <= 0:
        raise InvalidRequestError("length and rate scales must be positive")
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise InvalidRequestError(f"{path} lacks the columns {', '.join(missing)}", param="trace")
            rows: list[dict[str, str]] = []
            for row in reader:
                if num_requests is not None and len(rows) >= num_requests:
                    break
                rows.append(row)
    except FileNotFoundError as e:
        raise InvalidRequestError(f"no trace at {path}", param="trace") from e
    if not rows:
        raise InvalidRequestError(f"{path} holds no requests", param="trace")
    try:
        start = float(rows[0]["arrived_at"])
        out = []
        for row in rows:
            prompt = max(1, round(int(row["num_prefill_tokens"]) * length_scale))
            output = max(1, round(int(row["num_decode_tokens"]) * length_scale))
            if max_total_tokens is not None and prompt + output > max_total_tokens:
                output = min(output, max_total_tokens - 1)
                prompt = max(1, max_total_tokens - output)
            out.append(TraceRequest((float(row["arrived_at"]) - start) / rate_scale, prompt, output))
    except ValueError as e:
        raise InvalidRequestError(f"{path}: a row is not numbers: {e}", param="trace") from e
    return out


def with_rate_scale(requests: Sequence[TraceRequest], factor: float) -> list[TraceRequest]:
    """The same requests with arrival gaps divided by `factor`."""
    return [TraceRequest(r.arrival_s / factor, r.prompt_tokens, r.output_tokens) for r in requests]


def with_length_scales(
    requests: Sequence[TraceRequest], prompt_scale: float, output_scale: float
) -> list[TraceRequest]:
    """The same requests with prompt and output lengths scaled separately (at least 1
    token each): a trace with long prompts and short heavy-tailed outputs keeps its tail
    when only prompts shrink."""
    if not (prompt_scale > 0 and output_scale > 0):
        raise InvalidRequestError("length scales must be positive", param="length_scale")
    return [
        TraceRequest(
            r.arrival_s,
            max(1, round(r.prompt_tokens * prompt_scale)),
            max(1, round(r.output_tokens * output_scale)),
        )
        for r in requests
    ]


def with_arrivals(requests: Sequence[TraceRequest], times: Sequence[float]) -> list[TraceRequest]:
    """The same lengths with other arrival times (one per request)."""
    return [TraceRequest(t, r.prompt_tokens, r.output_tokens) for r, t in zip(requests, times, strict=True)]


def mean_rate(requests: Sequence[TraceRequest]) -> float:
    """Requests per second over the trace's span (inf when they all arrive at once)."""
    span = requests[-1].arrival_s - requests[0].arrival_s if requests else 0.0
    return (len(requests) - 1) / span if span > 0 else float("inf")


def synthetic_prompt(index: int, length: int, vocab_size: int, *, low: int = 100) -> list[int]:
    """A reproducible prompt of `length` token ids, different per request (so no two
    requests share a prefix), avoiding the low ids where special tokens live."""
    rng = random.Random(index)
    return [rng.randrange(low, vocab_size) for _ in range(length)]
