"""`ember bench cold`: the cold-start overhead of a serverless model, by tier.

For each model: the time to first token of a streaming chat completion over HTTP
from zero instances, minus the time to first token with the instance warm (the
same request sent right after), when the weights come from the node's DRAM pool,
from its disk cache with the page cache dropped, or from a registry over loopback
HTTP with every nearer copy dropped. Side by side, interleaved in the same run:
a serving process without Ember, which loads the model with transformers'
`from_pretrained` from safetensors (page cache dropped) and generates; its overhead
is that load plus its first token, minus Ember's warm TTFT. Medians over repeats.
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ember.bench.cold_baseline import SafetensorsCopy, transformers_cold_start, write_safetensors_copy
from ember.bench.cold_server import ColdServer, Tier, files_under
from ember.bench.nginx import serve_with_nginx
from ember.bench.registry_server import serve_registry
from ember.bench.wire import EMBER, WireRow, WireServer, best_raw, evicter, measure_wire
from ember.errors import EmberError
from ember.store.format import read_index

TIERS: tuple[Tier, ...] = ("registry", "dram", "disk")  # the order each repeat runs them in
BASELINE = "transformers"
DRAM_TARGET = 1 / 20  # DRAM-tier overhead <= this fraction of the baseline's
DISK_TARGET = 1 / 2
REGISTRY_TARGET = 1.0
WIRE_TARGET = 0.9  # Ember's download into DRAM >= this fraction of the raw limit's GB/s
PROMPT = [{"role": "user", "content": "Write one short sentence about the sea."}]
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BenchModel:
    """A model to benchmark: its name in the registry and its checkpoint directory."""

    name: str
    checkpoint: Path


@dataclass(frozen=True)
class ColdBenchConfig:
    repeats: int = 3
    max_tokens: int = 8
    warm_requests: int = 3  # warm TTFTs measured after each cold start (their median is used)
    keep_alive_s: float = 1.0
    engine_options: dict[str, Any] = field(default_factory=dict)
    registry_link_bps: float | None = None  # the registry behind one link of this many bytes/s


@dataclass(frozen=True)
class Sample:
    """One cold start. For Ember: `load_s` is the instance's start-up (tier I/O, engine
    build) and `tier` the tier it loaded from; for the baseline, `load_s` is
    from_pretrained (with the tokenizer) and `first_token_s` the generation's first token."""

    tier: str
    cold_ttft_s: float
    warm_ttft_s: float
    load_s: float
    first_token_s: float | None = None

    @property
    def overhead_s(self) -> float:
        return self.cold_ttft_s - self.warm_ttft_s


@dataclass
class ModelResult:
    name: str
    nbytes: int
    dtype: str
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # row (tier or baseline) -> samples
    wire: list[WireRow] = field(default_factory=list)  # the registry's download, raw and Ember's

    def early_first_tokens(self) -> tuple[int, int]:
        """(registry starts whose first token came before their last byte, starts):
        the request was sent before the load began, so TTFT < load means earlier."""
        regs = self.samples.get("registry", [])
        return sum(s.cold_ttft_s < s.load_s for s in regs), len(regs)

    def after_last_byte_s(self) -> float | None:
        """Median seconds from a registry start's last byte to its first token (an upper
        bound: the request is sent a little before the load begins). A forward that
        waited for every byte would take a whole warm prefill here; one run behind the
        download, only the layers still to compute when the last of them arrived."""
        regs = self.samples.get("registry", [])
        return statistics.median(s.cold_ttft_s - s.load_s for s in regs) if regs else None

    def warm_ttft_s(self) -> float:
        return statistics.median(s.warm_ttft_s for t in TIERS for s in self.samples.get(t, []))

    def overhead_s(self, row: str) -> float:
        return statistics.median(s.overhead_s for s in self.samples[row])

    def row_json(self, row: str) -> dict[str, Any]:
        samples = self.samples[row]
        return {
            "tier": row,
            "cold_ttft_s": statistics.median(s.cold_ttft_s for s in samples),
            "warm_ttft_s": statistics.median(s.warm_ttft_s for s in samples),
            "overhead_s": self.overhead_s(row),
            "load_s": statistics.median(s.load_s for s in samples),
            "observed_tiers": sorted({s.tier for s in samples}),
            "samples": [
                {
                    "tier": s.tier,
                    "cold_ttft_s": s.cold_ttft_s,
                    "warm_ttft_s": s.warm_ttft_s,
                    "overhead_s": s.overhead_s,
                    "load_s": s.load_s,
                    "first_token_s": s.first_token_s,
                }
                for s in samples
            ],
        }


@dataclass(frozen=True)
class Target:
    name: str
    model: str
    tier: str
    ratio: float  # tier overhead / baseline overhead (or GB/s / raw GB/s, at_least)
    goal: float  # at most (at least, with at_least)
    at_least: bool = False

    @property
    def met(self) -> bool:
        return self.ratio >= self.goal if self.at_least else self.ratio <= self.goal


@dataclass
class ColdReport:
    config: ColdBenchConfig
    models: list[ModelResult]
    notes: list[str] = field(default_factory=list)

    def targets(self) -> list[Target]:
        out = []
        for m in self.models:
            base = m.overhead_s(BASELINE)
            for tier, goal in (("dram", DRAM_TARGET), ("disk", DISK_TARGET), ("registry", REGISTRY_TARGET)):
                ratio = m.overhead_s(tier) / base if base > 0 else float("inf")
                out.append(
                    Target(f"{m.name}: {tier} overhead / transformers overhead", m.name, tier, ratio, goal)
                )
            for server in sorted({r.server for r in m.wire}):
                raw = best_raw(m.wire, server)
                ember = next(r for r in m.wire if r.server == server and r.method == EMBER)
                if raw is not None:
                    name = f"{m.name}: download into DRAM / raw limit ({server}, {raw.method})"
                    out.append(
                        Target(name, m.name, f"wire {server}", ember.gbps / raw.gbps, WIRE_TARGET, True)
                    )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "cold",
            "repeats": self.config.repeats,
            "max_tokens": self.config.max_tokens,
            "warm_requests": self.config.warm_requests,
            "keep_alive_s": self.config.keep_alive_s,
            "registry_link_bps": self.config.registry_link_bps,
            "prompt": PROMPT,
            "models": [
                {
                    "model": m.name,
                    "nbytes": m.nbytes,
                    "dtype": m.dtype,
                    "warm_ttft_s": m.warm_ttft_s(),
                    "rows": [m.row_json(r) for r in (*TIERS, BASELINE)],
                    "wire": [w.to_json() for w in m.wire],
                    "first_token_before_last_byte": list(m.early_first_tokens()),
                    "first_token_after_last_byte_s": m.after_last_byte_s(),
                }
                for m in self.models
            ],
            "targets": [
                {
                    "name": t.name,
                    "model": t.model,
                    "tier": t.tier,
                    "ratio": t.ratio,
                    "goal": t.goal,
                    "at_least": t.at_least,
                    "met": t.met,
                }
                for t in self.targets()
            ],
            "notes": self.notes,
        }


def stream_ttft(client: httpx.Client, url: str, model: str, max_tokens: int) -> tuple[float, int]:
    """Send PROMPT as a streaming chat completion; (seconds to the first token's chunk,
    tokens received). logprobs make every token a chunk, even one with no text yet."""
    body = {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "logprobs": True,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise EmberError(f"{model}: HTTP {resp.status_code} {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            payload = line.removeprefix("data:").strip()
            if not line.startswith("data:") or payload == "[DONE]":
                continue
            data = json.loads(payload)
            if data.get("error"):
                raise EmberError(f"{model}: {data['error']}")
            for choice in data.get("choices", []):
                delta = choice.get("delta", {})
                if "role" not in delta and (delta.get("content") or choice.get("logprobs")):
                    first = first if first is not None else time.perf_counter()
                    tokens += len((choice.get("logprobs") or {}).get("content") or [None])
    if first is None:
        raise EmberError(f"{model}: the stream carried no token")
    return first - start, tokens


def _ember_sample(server: ColdServer, model: str, tier: Tier, cfg: ColdBenchConfig) -> Sample:
    server.wait_scaled_to_zero()
    server.prepare(model, tier)
    before = server.last_load()
    cold, _ = stream_ttft(server.http, server.url, model, cfg.max_tokens)
    load = server.next_load(before)
    if load is None or load.model != model:
        raise EmberError(f"{model}: the request did not start an instance (was one still up?)")
    server.node.store.settle(model)  # a registry start's disk copy: written before warm runs are timed
    warm = [stream_ttft(server.http, server.url, model, cfg.max_tokens)[0] for _ in range(cfg.warm_requests)]
    return Sample(load.tier, cold, statistics.median(warm), load.actual_s)


def _baseline_sample(copy: SafetensorsCopy, cfg: ColdBenchConfig, warm_ttft_s: float) -> Sample:
    s = transformers_cold_start(copy, PROMPT, cfg.max_tokens)
    gc.collect()
    return Sample("safetensors", s.load_s + s.first_token_s, warm_ttft_s, s.load_s, s.first_token_s)


def _link_copy(src: Path, dest: Path) -> None:
    """`src` at `dest` by hard links (a copy where links are refused)."""
    if dest.exists():
        return

    def link(a: str, b: str) -> None:
        try:
            Path(b).hardlink_to(a)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=link)


def run_cold_bench(
    models: list[BenchModel], work: Path, cfg: ColdBenchConfig, progress: Progress | None = None
) -> ColdReport:
    """Benchmark `models` (checkpoint directories) in scratch directory `work`: a
    registry of them served over loopback HTTP, an Ember server fetching from it, and
    a safetensors copy of each for the baseline."""
    report = ColdReport(cfg, [])
    registry = work / "registry"
    copies: dict[str, SafetensorsCopy] = {}
    for m in models:
        _link_copy(m.checkpoint, registry / m.name)
        copies[m.name] = write_safetensors_copy(m.checkpoint, work / "safetensors" / m.name)
        nbytes = read_index(m.checkpoint).total_bytes
        report.models.append(ModelResult(m.name, nbytes, str(copies[m.name].dtype).removeprefix("torch.")))
    total = len(models) * ((cfg.repeats + 1) * (len(TIERS) + 1) + 1)
    done = 0

    def step(stage: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(stage, done, total)

    with (
        serve_registry(registry, cfg.registry_link_bps) as url,
        serve_with_nginx(registry, work / "nginx") as nginx_url,
        ColdServer(
            work / "home", url, registry, keep_alive_s=cfg.keep_alive_s, engine_options=cfg.engine_options
        ) as server,
    ):
        for m in models:
            server.deploy(m.name)
        for rnd in range(cfg.repeats + 1):  # round 0 warms up (imports, first fetch) and is dropped
            for result in report.models:
                warm: list[float] = []
                for tier in TIERS:
                    sample = _ember_sample(server, result.name, tier, cfg)
                    warm.append(sample.warm_ttft_s)
                    if rnd > 0:
                        result.samples.setdefault(tier, []).append(sample)
                    step(f"{result.name} {tier}")
                base = _baseline_sample(copies[result.name], cfg, statistics.median(warm))
                if rnd > 0:
                    result.samples.setdefault(BASELINE, []).append(base)
                step(f"{result.name} {BASELINE}")
        servers = [WireServer("RegistryServer", url)]
        if nginx_url is not None:
            servers.append(WireServer("nginx", nginx_url))
        for result in report.models:
            if cfg.registry_link_bps is None:  # behind a link, every client runs at the link's rate
                ckpt = registry / result.name
                result.wire = measure_wire(ckpt, result.name, servers, cfg.repeats, evicter(registry))
            step(f"{result.name} wire")
    report.notes.extend(_notes(report, registry))
    if cfg.registry_link_bps is not None:
        gbps = cfg.registry_link_bps * 8 / 1e9
        report.notes.append(f"the registry sat behind a {gbps:g} Gb/s link: the wire was not measured")
    elif nginx_url is None:
        report.notes.append("nginx is not installed: the wire was measured with the RegistryServer alone")
    return report


def _notes(report: ColdReport, registry: Path) -> list[str]:
    notes = []
    for m in report.models:
        for tier in TIERS:
            seen = {s.tier for s in m.samples[tier]}
            if seen != {tier}:
                notes.append(f"{m.name}: runs meant for the {tier} tier loaded from {sorted(seen)}")
    for m in report.models:
        early, starts = m.early_first_tokens()
        notes.append(
            f"{m.name}: the first token came before the last byte in {early} of {starts} registry starts"
        )
        tail = m.after_last_byte_s()
        if tail is not None:
            notes.append(
                f"{m.name}: a registry start's first token came {tail:.3f} s after its last byte "
                f"(median), where a whole warm prefill takes {m.warm_ttft_s():.3f} s"
            )
    size = sum(f.stat().st_size for f in files_under(registry))
    notes.append(f"registry: {size / 1e9:.2f} GB served over loopback HTTP by a separate process")
    return notes
