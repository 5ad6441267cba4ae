"""`ember bench serve`: a load generator for any OpenAI-compatible server.

Requests stream from /v1/completions with token-id prompts (text for the mixed
dataset), `max_tokens` = the wanted output length and `ignore_eos` (a vLLM/Ember
extension), so a trace's lengths are reproduced exactly where the server honours it;
a `logit_bias` that bans the end-of-sequence tokens does the same on servers without
`ignore_eos` (llama.cpp's). Each request records its time to
first token, the gaps between streamed chunks and its end-to-end latency; the output
token count comes from the final `usage` chunk (stream_options.include_usage). A
request that fails is recorded with its error; the run goes on."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from ember.bench.serve_metrics import RequestResult, ServeMetrics, compute_metrics, metrics_json, result_block
from ember.bench.serve_workload import BenchRequest, Workload, WorkloadSpec, build_workload
from ember.errors import EmberError

Clock = Callable[[], float]
_REQUEST_TIMEOUT_S = 6 * 3600  # as vLLM's benchmark: a long request is slow, not failed


@dataclass(frozen=True)
class ServeTarget:
    """Where to send requests: `base_url` is the server's root (a trailing /v1 is allowed)."""

    base_url: str
    model: str
    api_key: str | None = None
    ignore_eos: bool = True
    logit_bias: dict[str, float] | None = None  # token id (as text) -> bias, sent as is
    extra_body: dict[str, Any] | None = None  # more request fields, sent as is

    @property
    def api_root(self) -> str:
        root = self.base_url.rstrip("/")
        return root if root.endswith("/v1") else f"{root}/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def parse_logit_bias(text: str | None) -> dict[str, float] | None:
    """'0:-100,2:-100' -> {"0": -100.0, "2": -100.0}; EmberError for anything else."""
    if not text:
        return None
    bias: dict[str, float] = {}
    for item in text.split(","):
        token, _, value = item.partition(":")
        try:
            bias[str(int(token))] = float(value)
        except ValueError:
            raise EmberError(
                f"--logit-bias takes TOKEN:BIAS,... (integers and numbers), got {item!r}"
            ) from None
    return bias


def parse_extra_body(text: str | None) -> dict[str, Any] | None:
    """A JSON object of request fields; EmberError for anything else."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise EmberError(f"--extra-body must be a JSON object: {e}") from None
    if not isinstance(value, dict):
        raise EmberError(f"--extra-body must be a JSON object, got {text!r}")
    return value


@dataclass
class RunResult:
    results: list[RequestResult]
    duration_s: float  # first send to last completion
    max_concurrency: int | None = None


def split_gaps(gaps: list[float], tokens: int) -> list[float]:
    """Inter-token latencies from the gaps between streamed chunks when `tokens` tokens
    arrived after the first chunk: a chunk may carry several tokens (a detokenizer holds
    back partial characters), so a gap that covered k tokens gives k latencies of gap/k.
    The tokens are spread evenly, the remainder to the longest gaps. With fewer tokens
    than gaps (a server that sends empty chunks) the gaps are kept as they are."""
    if not gaps or tokens <= len(gaps):
        return list(gaps)
    base, extra = divmod(tokens, len(gaps))
    longest = set(sorted(range(len(gaps)), key=lambda i: -gaps[i])[:extra])
    out: list[float] = []
    for i, gap in enumerate(gaps):
        k = base + (1 if i in longest else 0)
        out.extend([gap / k] * k)
    return out


def _error_message(status: int, body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        message = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        message = body.decode("utf-8", "replace")[:200]
    return f"HTTP {status}: {message}"


async def send_request(
    client: httpx.AsyncClient, target: ServeTarget, req: BenchRequest, clock: Clock = time.perf_counter
) -> RequestResult:
    """Stream one completion and time it. Never raises: a failure is a result with
    success False and the error's message."""
    body: dict[str, Any] = {
        "model": target.model,
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.logit_bias:
        body["logit_bias"] = target.logit_bias
    body.update(target.extra_body or {})
    result = RequestResult(input_len=req.input_len)
    start = clock()
    chunks: list[float] = []  # arrival time of every chunk that carried a choice
    usage_tokens: int | None = None
    try:
        async with client.stream(
            "POST", f"{target.api_root}/completions", json=body, headers=target.headers()
        ) as resp:
            if resp.status_code != 200:
                result.error = _error_message(resp.status_code, await resp.aread())
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line.removeprefix("data:").strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if data.get("error"):
                    result.error = _error_message(200, payload.encode())
                    return result
                if data.get("choices"):
                    chunks.append(clock())
                if usage := data.get("usage"):
                    usage_tokens = int(usage["completion_tokens"])
                    result.input_len = int(usage.get("prompt_tokens") or result.input_len)
    except Exception as exc:  # any failure of one request is counted, never ends the run
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return result
    if not chunks:
        result.error = "the stream ended with no output"
        return result
    result.latency_s = clock() - start
    result.ttft_s = chunks[0] - start
    result.output_len = usage_tokens if usage_tokens is not None else len(chunks)
    result.usage_reported = usage_tokens is not None
    gaps = [b - a for a, b in itertools.pairwise(chunks)]
    result.itls_s = split_gaps(gaps, result.output_len - 1)
    result.success = True
    return result


async def run_requests(
    target: ServeTarget,
    workload: Workload,
    *,
    max_concurrency: int | None = None,
    on_done: Callable[[int, int], None] | None = None,
    clock: Clock = time.perf_counter,
) -> RunResult:
    """Send every request of `workload` at its arrival time (at most `max_concurrency`
    in flight; the rest wait for a slot) and collect the results in request order."""
    if max_concurrency is not None and max_concurrency < 1:
        raise EmberError("--max-concurrency must be at least 1")
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    total, done = len(workload.requests), 0
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(_REQUEST_TIMEOUT_S), limits=limits) as client:
        t0 = clock()

        async def one(req: BenchRequest) -> RequestResult:
            nonlocal done
            wait = req.arrival_s - (clock() - t0)
            if wait > 0:
                await asyncio.sleep(wait)
            if slots is None:
                result = await send_request(client, target, req, clock)
            else:
                async with slots:
                    result = await send_request(client, target, req, clock)
            done += 1
            if on_done is not None:
                on_done(done, total)
            return result

        results = await asyncio.gather(*(one(r) for r in workload.requests))
        duration = clock() - t0
    return RunResult(list(results), duration, max_concurrency)


def list_models(base_url: str, api_key: str | None) -> list[str]:
    """The model ids a server lists at /v1/models."""
    target = ServeTarget(base_url, "", api_key)
    try:
        resp = httpx.get(f"{target.api_root}/models", headers=target.headers(), timeout=30)
    except httpx.HTTPError as exc:
        raise EmberError(f"no server answers at {base_url} ({type(exc).__name__}: {exc})") from exc
    if resp.status_code != 200:
        raise EmberError(f"{base_url}: {_error_message(resp.status_code, resp.content)}")
    return [str(m["id"]) for m in resp.json().get("data", [])]


@dataclass
class ServeReport:
    """One run of `ember bench serve`: what was sent, what came back, the figures."""

    target: ServeTarget
    spec: WorkloadSpec
    workload: Workload
    run: RunResult
    metrics: ServeMetrics

    def notes(self) -> list[str]:
        ok = [(r, q) for r, q in zip(self.run.results, self.workload.requests, strict=True) if r.success]
        notes = []
        if unreported := sum(1 for r, _ in ok if not r.usage_reported):
            notes.append(f"{unreported} requests: no usage from the server; output tokens counted as chunks")
        if short := sum(1 for r, q in ok if r.output_len != q.output_len):
            notes.append(
                f"{short} requests: output length differs from the asked max_tokens "
                "(the server may not honour ignore_eos)"
            )
        errors = Counter(r.error for r in self.run.results if not r.success)
        notes.extend(f"{n} failed: {message}" for message, n in errors.most_common(3))
        return notes

    def to_json(self) -> dict[str, Any]:
        """vLLM's result JSON plus the run's settings and a `scaling` object."""
        extra = {
            "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
            "backend": "openai",
            "base_url": self.target.base_url,
            "model_id": self.target.model,
            "dataset": self.workload.dataset,
            "num_prompts": len(self.workload.requests),
            "request_rate": _rate_json(self.spec.request_rate, self.workload),
            "burstiness": self.spec.burstiness,
            "max_concurrency": self.run.max_concurrency,
            "seed": self.spec.seed,
            "ignore_eos": self.target.ignore_eos,
            "scaling": self.workload.scaling,
        }
        return {**metrics_json(self.metrics, self.run.results, extra), "notes": self.notes()}

    def block(self) -> str:
        """The result block as vLLM prints it, then the dataset, scaling and notes."""
        head: list[tuple[str, object]] = []
        if self.run.max_concurrency:
            head.append(("Maximum request concurrency:", self.run.max_concurrency))
        scaling = ", ".join(f"{k}={v}" for k, v in self.workload.scaling.items())
        tail = [
            f"Dataset: {self.workload.dataset}, {len(self.workload.requests)} requests",
            f"Scaling: {scaling}",
        ]
        return result_block(self.metrics, head=head, tail=tail + [f"Note: {n}" for n in self.notes()])


def _rate_json(rate: float | None, workload: Workload) -> float | str:
    if workload.scaling.get("arrivals") == "trace":
        return "trace"
    return "inf" if rate is None or math.isinf(rate) else rate


def run_serve_bench(
    target: ServeTarget,
    spec: WorkloadSpec,
    *,
    max_concurrency: int | None = None,
    on_done: Callable[[int, int], None] | None = None,
) -> ServeReport:
    """Build the workload, send it, and compute the figures."""
    workload = build_workload(spec)
    run = asyncio.run(run_requests(target, workload, max_concurrency=max_concurrency, on_done=on_done))
    return ServeReport(target, spec, workload, run, compute_metrics(run.results, run.duration_s))
