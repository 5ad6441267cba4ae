"""Multi-model request traces for `ember bench cluster` and `ember sim`.

A cluster trace is a CSV with columns arrived_at (seconds), model (a deployment name),
num_prefill_tokens and num_decode_tokens: the single-model trace format of
bench/workload.py plus the model each request is for. A generated workload draws the
model of each request by Zipf popularity (rank i has weight 1/i^s, as serverless
function popularity is commonly modelled), arrival times from the Azure LLM trace's own
pattern rescaled to a rate (or bench/arrivals.py's gamma process), and prompt / output
lengths from the trace rows in order.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.bench.arrivals import at_rate, seeded_arrivals
from ember.bench.workload import read_trace
from ember.errors import InvalidRequestError

CLUSTER_COLUMNS = ("arrived_at", "model", "num_prefill_tokens", "num_decode_tokens")
DEFAULT_LENGTHS_TRACE = Path(__file__).resolve().parents[3] / "data" / "azure_llm_2023_conv.csv"


@dataclass(frozen=True)
class ClusterRequest:
    arrival_s: float  # from the first request
    model: str  # deployment name
    prompt_tokens: int
    output_tokens: int


def read_cluster_trace(path: str | Path, *, num_requests: int | None = None) -> list[ClusterRequest]:
    """The first `num_requests` rows of a cluster trace, times from the first arrival."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CLUSTER_COLUMNS if c not in (reader.fieldnames or ())]
            if missing:
                raise InvalidRequestError(f"{path} lacks the columns {', '.join(missing)}", param="trace")
            rows = list(itertools.islice(reader, num_requests))
    except FileNotFoundError as e:
        raise InvalidRequestError(f"no trace at {path}", param="trace") from e
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InvalidRequestError(f"cannot read the trace {path}: {e}", param="trace") from e
    if not rows:
        raise InvalidRequestError(f"{path} holds no requests", param="trace")
    return [_parse_row(path, i + 2, row) for i, row in enumerate(rows)]


def _parse_row(path: Path, line: int, row: dict[str, str]) -> ClusterRequest:
    try:
        arrival = float(row["arrived_at"])
        prompt, output = int(row["num_prefill_tokens"]), int(row["num_decode_tokens"])
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"{path} line {line}: a field is not a number: {e}", param="trace") from e
    model = (row.get("model") or "").strip()
    if not model:
        raise InvalidRequestError(f"{path} line {line}: the model is empty", param="trace")
    if prompt < 1 or output < 1 or not arrival >= 0:
        raise InvalidRequestError(
            f"{path} line {line}: lengths must be >= 1 and arrived_at >= 0", param="trace"
        )
    return ClusterRequest(arrival, model, prompt, output)


def write_cluster_trace(path: str | Path, requests: Sequence[ClusterRequest]) -> None:
    """Write `requests` in the cluster trace format (read_cluster_trace reads it back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CLUSTER_COLUMNS)
        for r in requests:
            writer.writerow((repr(r.arrival_s), r.model, r.prompt_tokens, r.output_tokens))


def zipf_weights(n_models: int, s: float) -> list[float]:
    """Popularity of ranks 1..n: weight 1/i^s, normalised to sum to 1 (s = 0: uniform)."""
    if n_models < 1:
        raise InvalidRequestError(f"need at least one model, got {n_models}", param="models")
    if not s >= 0:
        raise InvalidRequestError(f"--zipf must be >= 0, got {s}", param="zipf")
    raw = [1.0 / (i**s) for i in range(1, n_models + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _unit_azure_times(trace: Sequence[float], n: int) -> list[float]:
    """`n` arrival times at mean rate 1 with the trace's own gaps, the trace repeated
    end to end when `n` is longer than it (each repeat starts one mean gap after the last)."""
    span = trace[-1] - trace[0]
    if len(trace) < 2 or span <= 0:
        raise InvalidRequestError("the lengths trace needs distinct arrival times for azure arrivals")
    mean_gap = span / (len(trace) - 1)
    out: list[float] = []
    offset = 0.0
    while len(out) < n:
        out.extend(offset + (t - trace[0]) / mean_gap for t in trace[: n - len(out)])
        offset = out[-1] + 1.0
    return out


def _arrival_times(kind: str, n: int, rate: float, seed: int, trace_times: Sequence[float]) -> list[float]:
    if kind == "azure":
        return at_rate(_unit_azure_times(trace_times, n), rate)
    if kind == "poisson":
        return seeded_arrivals(n, rate, 1.0, seed)
    if kind.startswith("gamma:"):
        try:
            burstiness = float(kind.split(":", 1)[1])
        except ValueError as e:
            raise InvalidRequestError(f"bad arrivals {kind!r}: gamma:<burstiness>", param="arrivals") from e
        return seeded_arrivals(n, rate, burstiness, seed)
    raise InvalidRequestError(
        f"unknown arrivals {kind!r}: azure, poisson or gamma:<burstiness>", param="arrivals"
    )


def generate_cluster_workload(
    models: Sequence[str],
    *,
    requests: int,
    rate: float,
    zipf: float,
    seed: int,
    arrivals: str = "azure",
    lengths_trace: Path | None = None,
    prompt_scale: float = 1.0,
    output_scale: float = 1.0,
) -> list[ClusterRequest]:
    """`requests` requests over `models` (the first is the most popular), deterministic
    for a seed. Lengths come from the trace's rows in order (cycled), scaled, >= 1 each."""
    if requests < 1:
        raise InvalidRequestError(f"--requests must be >= 1, got {requests}", param="requests")
    if not (prompt_scale > 0 and output_scale > 0):
        raise InvalidRequestError("length scales must be positive", param="length_scale")
    weights = zipf_weights(len(models), zipf)
    trace = read_trace(lengths_trace or DEFAULT_LENGTHS_TRACE)
    times = _arrival_times(arrivals, requests, rate, seed, [r.arrival_s for r in trace])
    cumulative = list(itertools.accumulate(weights))
    rng = random.Random(f"cluster-models-{seed}")  # a stream apart from the arrivals' own
    out = []
    for i, t in enumerate(times):
        rank = min(bisect.bisect_left(cumulative, rng.random() * cumulative[-1]), len(models) - 1)
        row = trace[i % len(trace)]
        out.append(
            ClusterRequest(
                t,
                models[rank],
                max(1, round(row.prompt_tokens * prompt_scale)),
                max(1, round(row.output_tokens * output_scale)),
            )
        )
    return out
