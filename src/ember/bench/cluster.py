"""`ember bench cluster`: the serverless cluster under a multi-model workload, for real.

One registry of M models served over loopback HTTP from a child process; for each
placement policy, one after another, a fresh Ember server (bench/cluster_server.py:
the HTTP app, the controller, N embedded nodes with bounded DRAM pools and disk
caches, every deployment min-instances 0) in its own home, so every policy starts
from the same state: empty pools and caches, the registry's files out of the page
cache. The workload (bench/cluster_workload.py) goes through the official `openai`
client, streamed, each request sent at its arrival time and timed by the client
(TTFT: the first chunk with a choice; E2E: the stream's end).

Each request's start tier is the tier of the instance that served it when no ready
instance of its model existed as it was sent (it waited for that start), else None.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any

from ember.bench.cluster_models import ClusterModel, link_registry
from ember.bench.cluster_report import RequestOutcome, policy_summary
from ember.bench.cluster_server import ClusterServer, ClusterShape
from ember.bench.cluster_workload import CLUSTER_COLUMNS, ClusterRequest
from ember.bench.code_version import code_commit
from ember.bench.registry_server import serve_registry
from ember.engine.options import DEFAULT_MAX_NUM_SEQS
from ember.errors import EmberError, MissingDependencyError

Progress = Callable[[str, int, int], None]
_VOCAB_LOW, _VOCAB_HIGH = 300, 40000  # prompt token ids drawn from here (SmolLM2's vocabulary)
MAX_INSTANCES = 1  # of every deployment (server.deploy's default)


@dataclass(frozen=True)
class ClusterBenchConfig:
    policies: tuple[str, ...]
    shape: ClusterShape
    seed: int = 0
    max_model_len: int = 2048  # prompt + output of each request is cut to fit
    registry_bps: float | None = None  # the registry's link, bytes/s (None: loopback's own speed)
    # how the workload was made (the CLI's flags: requests, rate, zipf, ... or trace),
    # recorded in the JSON beside the trace itself
    workload: dict[str, Any] = field(default_factory=dict)


@dataclass
class PolicyRun:
    policy: str
    outcomes: list[RequestOutcome]
    summary: dict[str, Any]
    wall_s: float


@dataclass
class ClusterReport:
    config: ClusterBenchConfig
    models: list[ClusterModel]
    requests: list[ClusterRequest]
    runs: list[PolicyRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    code: str | None = field(default_factory=code_commit)  # the commit it started on (a checkout may move)

    def to_json(self) -> dict[str, Any]:
        """The report; "cluster", "models" (slots: GPU slots an instance takes) and
        "trace" (every request as sent, after `fit`) are what `ember sim --from-bench`
        reads to replay the run."""
        shape = self.config.shape
        return {
            "benchmark": "cluster",
            "cluster": {
                "nodes": shape.nodes,
                "slots": shape.slots,
                "dram_bytes": shape.dram_bytes,
                "disk_bytes": shape.disk_bytes,
                "keep_alive_s": shape.keep_alive_s,
                "max_instances": MAX_INSTANCES,
                "max_batch": shape.engine_options.get("max_num_seqs", DEFAULT_MAX_NUM_SEQS),
                "start_timeout_s": shape.start_timeout_s,
                "max_model_len": self.config.max_model_len,
                "engine_options": shape.engine_options,
                "registry_bps": self.config.registry_bps,
            },
            "models": [{"name": m.name, "nbytes": m.nbytes, "slots": 1} for m in self.models],
            "requests": len(self.requests),
            "duration_s": self.requests[-1].arrival_s if self.requests else 0.0,
            "workload": {**self.config.workload, "seed": self.config.seed},
            "code": self.code,
            "trace": [dict(zip(CLUSTER_COLUMNS, astuple(r), strict=True)) for r in self.requests],
            "policies": {r.policy: r.summary for r in self.runs},
            "notes": self.notes,
        }

    def outcomes(self) -> dict[str, list[RequestOutcome]]:
        return {r.policy: r.outcomes for r in self.runs}


def prompt_ids(request: ClusterRequest, rng: random.Random) -> list[int]:
    return [rng.randrange(_VOCAB_LOW, _VOCAB_HIGH) for _ in range(request.prompt_tokens)]


def fit(request: ClusterRequest, max_model_len: int) -> ClusterRequest:
    """The request with its prompt cut so that prompt + output fit the context."""
    output = max(1, min(request.output_tokens, max_model_len // 2))
    prompt = max(1, min(request.prompt_tokens, max_model_len - output))
    return ClusterRequest(request.arrival_s, request.model, prompt, output)


def _openai() -> Any:
    try:
        import openai
    except ImportError as exc:
        raise MissingDependencyError(
            "ember bench cluster sends its requests with the openai client: pip install 'ember[bench]'"
        ) from exc
    return openai


async def _instance_of(server: ClusterServer, model: str, *, ready_only: bool) -> str | None:
    """The newest live instance of `model` (read on the server's loop); None if none."""

    async def look() -> str | None:
        routes = [r for r in server.controller.router.routes(model) if r.ready or not ready_only]
        started = [r.instance_id for r in routes if r.instance_id in server.log.tiers]
        order = list(server.log.tiers)
        return max(started, key=order.index, default=None)

    return await asyncio.wrap_future(server.submit(look()))


async def _one(
    client: Any, server: ClusterServer, req: ClusterRequest, prompt: list[int], timeout_s: float
) -> RequestOutcome:
    openai = _openai()
    cold = await _instance_of(server, req.model, ready_only=True) is None
    start = time.perf_counter()
    first: float | None = None
    error: str | None = None
    timed_out = False
    try:
        stream = await client.completions.create(
            model=req.model, prompt=prompt, max_tokens=req.output_tokens, temperature=0.0,
            stream=True, extra_body={"ignore_eos": True}, timeout=timeout_s,
        )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and first is None:
                first = time.perf_counter()
    except openai.APIStatusError as exc:
        timed_out = exc.status_code == 503
        error = f"HTTP {exc.status_code}: {exc.message}"
    except openai.APITimeoutError:
        timed_out, error = True, "the client timed out"
    except openai.APIError as exc:
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    if error is None and first is None:
        error = "the stream carried no token"
    tier = waited = None
    if cold and error is None:
        instance = await _instance_of(server, req.model, ready_only=False)
        tier = server.log.tiers.get(instance) if instance else None
        waited = instance in server.log.waited
    ok = error is None and first is not None
    return RequestOutcome(
        model=req.model, arrival_s=req.arrival_s, ttft_s=first - start if ok and first else None,
        e2e_s=end - start if ok else None, start_tier=tier, waited_for_slot=bool(waited),
        timed_out=timed_out, error=error,
    )  # fmt: skip


async def send_workload(
    server: ClusterServer,
    requests: Sequence[ClusterRequest],
    prompts: Sequence[list[int]],
    on_done: Callable[[], None] = lambda: None,
) -> list[RequestOutcome]:
    """Every request at its arrival time through the openai client; outcomes in order."""
    openai = _openai()
    timeout_s = server.shape.start_timeout_s + 600.0
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="bench", max_retries=0) as client:
        t0 = time.perf_counter()

        async def at_arrival(req: ClusterRequest, prompt: list[int]) -> RequestOutcome:
            await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - t0)))
            outcome = await _one(client, server, req, prompt, timeout_s)
            on_done()
            return outcome

        return list(await asyncio.gather(*(at_arrival(r, p) for r, p in zip(requests, prompts, strict=True))))


def inference_costs(
    requests: Sequence[ClusterRequest], outcomes: Sequence[RequestOutcome]
) -> dict[str, dict[str, float | int | None]]:
    """Per model, from its requests that found an instance ready (no start in their
    TTFT): median prefill s/token (TTFT / prompt tokens) and decode s/step ((E2E -
    TTFT) / (output tokens - 1)). Measured under the run's own concurrency."""
    per: dict[str, tuple[list[float], list[float]]] = {}
    for req, out in zip(requests, outcomes, strict=True):
        if out.start_tier is not None or out.ttft_s is None or out.e2e_s is None:
            continue
        prefill, decode = per.setdefault(req.model, ([], []))
        prefill.append(out.ttft_s / req.prompt_tokens)
        if req.output_tokens > 1:
            decode.append((out.e2e_s - out.ttft_s) / (req.output_tokens - 1))
    return {
        m: {
            "prefill_s_per_token": statistics.median(p) if p else None,
            "decode_s_per_step": statistics.median(d) if d else None,
            "warm_requests": len(p),
        }
        for m, (p, d) in sorted(per.items())
    }


def run_policy(
    policy: str,
    work: Path,
    registry_url: str,
    registry_root: Path,
    cfg: ClusterBenchConfig,
    requests: Sequence[ClusterRequest],
    prompts: Sequence[list[int]],
    models: Sequence[ClusterModel],
    on_done: Callable[[], None] = lambda: None,
) -> PolicyRun:
    """One policy's run from an empty cluster (a fresh home under `work`)."""
    home = work / "runs" / policy
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    try:
        with ClusterServer(home, registry_url, registry_root, policy, cfg.shape) as server:
            for m in models:
                server.deploy(m.name, max_instances=MAX_INSTANCES)
            began, began_mono = time.perf_counter(), time.monotonic()
            outcomes = asyncio.run(send_workload(server, requests, prompts, on_done))
            wall = time.perf_counter() - began
            server.submit(server.controller.settle()).result()
            log = server.log
            extra = {
                "wall_s": wall,
                "starts_waited_for_slot": len(log.waited),
                "migrated_requests": log.migrated_requests,
                "bandwidths": server.estimator.snapshot(),
                "loads": log.load_figures(),
                "loads_recorded": server.loads(),  # by the controller, to check `starts` against
                "inference": inference_costs(requests, outcomes),
                # the raw records, for looking into a policy's choices
                "outcomes": [asdict(o) for o in outcomes],
                "start_records": log.start_records(),
                "decisions": [{**d, "at": d["at"] - began_mono} for d in log.decisions],
            }
            summary = policy_summary(
                outcomes, starts=log.by_tier(), migrations=log.migrations, reclaims=log.reclaims, extra=extra
            )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return PolicyRun(policy, outcomes, summary, wall)


def run_cluster_bench(
    models: Sequence[ClusterModel],
    requests: Sequence[ClusterRequest],
    work: Path,
    cfg: ClusterBenchConfig,
    progress: Progress | None = None,
) -> ClusterReport:
    """Every policy of `cfg` on the same workload, one after another (see the module)."""
    known = {m.name for m in models}
    unknown = sorted({r.model for r in requests} - known)
    if unknown:
        raise EmberError(f"the workload names models the bench does not serve: {', '.join(unknown)}")
    requests = [fit(r, cfg.max_model_len) for r in requests]
    rng = random.Random(cfg.seed)
    prompts = [prompt_ids(r, rng) for r in requests]
    report = ClusterReport(cfg, list(models), requests)
    registry = link_registry(models, work / "registry")
    total, done = len(requests) * len(cfg.policies), 0

    def step(policy: str) -> Callable[[], None]:
        def one() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(f"{policy}", done, total)

        return one

    with serve_registry(registry, cfg.registry_bps) as url:
        for policy in cfg.policies:
            run = run_policy(policy, work, url, registry, cfg, requests, prompts, models, step(policy))
            report.runs.append(run)
    size = sum(m.nbytes for m in models)
    link = f" behind a {cfg.registry_bps * 8 / 1e9:g} Gb/s link" if cfg.registry_bps else ""
    report.notes.append(f"registry: {len(models)} models, {size / 1e9:.2f} GB over loopback HTTP{link}")
    return report
