"""The figures of a serving benchmark, computed, printed and saved the way vLLM's
serving benchmark does (same result block, same JSON field names), so the two can be
set side by side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# (JSON key, printed name, section header) in vLLM's order.
_LATENCIES = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


@dataclass
class RequestResult:
    """What one request measured; times in seconds."""

    input_len: int
    success: bool = False
    output_len: int = 0
    ttft_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    usage_reported: bool = False  # output_len from the server's usage, not counted chunks
    error: str = ""


@dataclass
class ServeMetrics:
    """A run's figures. Latency statistics are in milliseconds, keyed like vLLM's JSON
    (`mean_ttft_ms`, `p99_itl_ms`, ...)."""

    completed: int
    failed: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    latency_ms: dict[str, float]


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, dtype=np.float64) * 1000 if values_s else np.zeros(1)
    return {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(ms.std()),
        f"p99_{name}_ms": float(np.percentile(ms, 99)),
    }


def compute_metrics(results: list[RequestResult], duration_s: float) -> ServeMetrics:
    """The run's figures from its requests' results; failed requests count only as
    failures. TPOT per request excludes the first token: (E2EL - TTFT) / (output - 1)."""
    ok = [r for r in results if r.success]
    total_in = sum(r.input_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    series = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [(r.latency_s - r.ttft_s) / (r.output_len - 1) for r in ok if r.output_len > 1],
        "itl": [x for r in ok for x in r.itls_s],
        "e2el": [r.latency_s for r in ok],
    }
    latency: dict[str, float] = {}
    for key, values in series.items():
        latency.update(_stats(key, values))
    return ServeMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) * per_s,
        output_throughput=total_out * per_s,
        total_token_throughput=(total_in + total_out) * per_s,
        latency_ms=latency,
    )


def metrics_json(
    metrics: ServeMetrics, results: list[RequestResult], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """vLLM's result JSON: the figures, then per-request lists (seconds, as vLLM saves
    them; failed requests appear with zeros and their error)."""
    return {
        **(extra or {}),
        "completed": metrics.completed,
        "failed": metrics.failed,
        "duration": metrics.duration,
        "total_input_tokens": metrics.total_input_tokens,
        "total_output_tokens": metrics.total_output_tokens,
        "request_throughput": metrics.request_throughput,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        **metrics.latency_ms,
        "input_lens": [r.input_len for r in results],
        "output_lens": [r.output_len for r in results],
        "ttfts": [r.ttft_s for r in results],
        "itls": [r.itls_s for r in results],
        "errors": [r.error for r in results],
    }


def _line(label: str, value: object) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40} {text:<10}".rstrip()


def result_block(metrics: ServeMetrics, *, head: list[tuple[str, object]], tail: list[str]) -> str:
    """The result block in vLLM's layout; `head` adds lines after the request counts
    (e.g. the concurrency), `tail` lines after the block (the scaling used)."""
    lines = [
        "{:=^50}".format(" Serving Benchmark Result "),
        _line("Successful requests:", metrics.completed),
        _line("Failed requests:", metrics.failed),
        *(_line(label, value) for label, value in head),
        _line("Benchmark duration (s):", metrics.duration),
        _line("Total input tokens:", metrics.total_input_tokens),
        _line("Total generated tokens:", metrics.total_output_tokens),
        _line("Request throughput (req/s):", metrics.request_throughput),
        _line("Output token throughput (tok/s):", metrics.output_throughput),
        _line("Total Token throughput (tok/s):", metrics.total_token_throughput),
    ]
    for key, name, header in _LATENCIES:
        lines.append(f"{header:-^50}")
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append(_line(f"{label} {name} (ms):", metrics.latency_ms[f"{stat}_{key}_ms"]))
    lines.append("=" * 50)
    lines.extend(tail)
    return "\n".join(lines)
