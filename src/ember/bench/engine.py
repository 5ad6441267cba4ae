"""`ember bench engine`: the instance engine against transformers on the same weights.

Reports prefill and decode throughput at several batch sizes (ours and transformers'
forward, interleaved, medians), the memory-bandwidth floor of a batch-1 decode step,
resident memory against weights + KV budget + 300 MB, and the start-up time from a
DRAM-pool hit ("weights in the pool" to "engine ready": no compilation, no warm-up,
KV memory allocated lazily); end to end, `LLM.generate` against transformers'
`generate` at each of `e2e_batches`, with the parts of Ember's iterations
(ember.bench.engine_e2e). With `background_load`, also decode speed beside that many
busy processes, Ember's thread settings against torch's defaults
(ember.bench.engine_threads).

The batch-1 decode step against the memory-bandwidth floor is reported, not a target
on a CPU: eager dispatch of ~40 small ops per layer cannot reach the floor there, and
torch's int8/int4 weight-only CPU kernels were slower than float32 matrix products on
the AVX2 machine it was tried on. It returns as a target on a GPU (CUDA graphs).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from ember.bench.engine_e2e import run_e2e_case
from ember.bench.engine_model import (
    Comparison,
    compare,
    hf_model,
    measure_bandwidth_floor,
    time_decode,
    weight_bytes,
)
from ember.bench.engine_threads import run_threads_case
from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.loader import load_engine
from ember.store.node import NodeStore

RSS_SLACK_BYTES = 300 << 20  # the target: resident <= weights + KV budget + 300 MB
OUTSIDE_FORWARD_BATCH = 16  # the batch at which time outside the forward has a bound
OUTSIDE_FORWARD_MAX = 0.10  # of the iteration


def e2e_bound(batch: int) -> float:
    """Least end-to-end ratio to transformers: level up to batch 16, 0.95 from 32 (where
    the forward alone is only ~1.05x and the iterations' own work weighs the most)."""
    return 0.95 if batch >= 32 else 1.0


@dataclass
class EngineBenchReport:
    checkpoint: str
    dtype: str
    device: str
    threads: int
    weight_bytes: int
    kv_budget_bytes: int
    startup_from_dram_s: float
    startup_samples_s: list[float]
    rss_bytes: int
    rss_limit_bytes: int
    bandwidth_gbps: float
    floor_step_s: float
    decode_b1_step_s: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    load_rows: list[dict[str, Any]] = field(default_factory=list)  # beside busy processes
    e2e_rows: list[dict[str, Any]] = field(default_factory=list)  # LLM.generate vs generate

    @property
    def floor_ratio(self) -> float:
        return self.decode_b1_step_s / self.floor_step_s

    def targets(self) -> list[dict[str, Any]]:
        """Each target: the measured ratio, the bound, and whether it is met."""
        resident = self.rss_bytes / self.rss_limit_bytes
        out = [
            _target(f"{r['case']}: ours / transformers tokens/s", r["speedup"], at_least=1.0)
            for r in self.rows
        ]
        if self.device != "cpu":  # retired on a CPU (see the module docstring)
            out.append(_target("batch-1 decode step / bandwidth floor", self.floor_ratio, at_most=1.2))
        out.append(_target("resident / (weights + KV budget + 300 MB)", resident, at_most=1.0))
        for r in self.e2e_rows:
            name = f"{r['case']}: LLM.generate / transformers generate tokens/s"
            out.append(_target(name, r["speedup"], at_least=e2e_bound(r["batch"])))
            if r["batch"] == OUTSIDE_FORWARD_BATCH:
                share = r["step_parts"]["outside_forward_share"]
                out.append(_target(f"{r['case']}: iteration time outside the forward", share,
                                   at_most=OUTSIDE_FORWARD_MAX))  # fmt: skip
        return out

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "floor_ratio": self.floor_ratio, "targets": self.targets()}


def _target(
    name: str, ratio: float, *, at_least: float | None = None, at_most: float | None = None
) -> dict[str, Any]:
    met = ratio >= at_least if at_least is not None else ratio <= (at_most or 0.0)
    bound = f">= {at_least}" if at_least is not None else f"<= {at_most}"
    return {"name": name, "ratio": ratio, "target": bound, "met": met}


def _row(c: Comparison) -> dict[str, Any]:
    return {
        "case": c.label,
        "tokens": c.tokens,
        "ours_s": c.ours_s,
        "hf_s": c.hf_s,
        "ours_tok_s": c.tokens / c.ours_s,
        "hf_tok_s": c.tokens / c.hf_s,
        "speedup": c.hf_s / c.ours_s,
    }


def startup_from_dram(
    node: NodeStore, name: str, config: EngineConfig, repeats: int
) -> tuple[Engine, list[float]]:
    """Load the checkpoint into the node's DRAM pool once, then time pool hit -> ready."""
    lease, _, _ = node.acquire(name)  # the first acquire loads it into the pool
    samples, engine = [], None
    for _ in range(repeats):
        engine = None
        gc.collect()
        start = time.perf_counter()
        hit, path, report = node.acquire(name)
        engine = load_engine(path, config, weights=hit.tensors)
        samples.append(time.perf_counter() - start)
        assert report.tier == "dram", report
        hit.release()
    lease.release()
    assert engine is not None
    return engine, samples


def run_engine_bench(
    name: str,
    path: Path,
    *,
    batches: tuple[int, ...] = (1, 8, 32),
    prompt_len: int = 512,
    rounds: int = 3,
    startup_repeats: int = 3,
    background_load: int | None = None,
    e2e_batches: tuple[int, ...] = (1, 16, 32),
    e2e_prompt_len: int = 64,
    e2e_new_tokens: int = 64,
) -> EngineBenchReport:
    node = NodeStore("bench-engine")
    config = EngineConfig(device="cpu")
    engine, samples = startup_from_dram(node, name, config, startup_repeats)
    model: Any = engine.runner.model
    wbytes = weight_bytes(model)
    kv_budget = config.default_kv_bytes(torch.device("cpu"))
    floor = measure_bandwidth_floor(wbytes)
    b1 = statistics.median(time_decode(model, 1) for _ in range(rounds))
    rss = psutil.Process().memory_info().rss  # before transformers' model exists
    lease, _, _ = node.acquire(name)
    try:
        hf = hf_model(path, dict(lease.tensors))
        rows = [_row(c) for c in compare(model, hf, batches=batches, prompt_len=prompt_len, rounds=rounds)]
    finally:
        lease.release()
    load_rows = [] if background_load is None else run_threads_case(path, background_load, rounds=rounds)
    e2e_rows = []
    if e2e_batches:
        e2e_rows = run_e2e_case(
            path, batches=e2e_batches, prompt_len=e2e_prompt_len, new_tokens=e2e_new_tokens, rounds=rounds
        )
    return EngineBenchReport(
        checkpoint=str(path),
        dtype=str(next(iter(lease.tensors.values())).dtype).removeprefix("torch."),
        device=config.torch_device.type,
        threads=torch.get_num_threads(),
        weight_bytes=wbytes,
        kv_budget_bytes=kv_budget,
        startup_from_dram_s=statistics.median(samples),
        startup_samples_s=samples,
        rss_bytes=rss,
        rss_limit_bytes=wbytes + kv_budget + RSS_SLACK_BYTES,
        bandwidth_gbps=floor.bytes_per_s / 1e9,
        floor_step_s=floor.floor_s,
        decode_b1_step_s=b1,
        rows=rows,
        load_rows=load_rows,
        e2e_rows=e2e_rows,
    )
