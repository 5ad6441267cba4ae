"""`ember bench load`: how fast a checkpoint loads, cold and warm, next to the raw
read limit of the same disk and to safetensors and torch.load of the same tensors.

One run, same bytes, methods interleaved round-robin within each repetition (so
drift in the machine's load hits every method alike), medians over repetitions.
Cold = fsync + POSIX_FADV_DONTNEED on every file the method reads; warm = those
files in the page cache. Every loader's output is touched page by page before its
clock stops."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ember.bench.page_cache import evict_page_cache, max_resident_fraction, touch_pages, warm_page_cache
from ember.bench.raw_read import RawRead, prepared_buffer, raw_grid, raw_read
from ember.store.format import read_index
from ember.store.io_profile import record_cold_mode
from ember.store.loader import load_tensors, supports_direct_io

Cache = Literal["cold", "warm", "dram"]
COLD_TARGET_VS_RAW = 0.9
COLD_TARGET_VS_SAFETENSORS = 1.0
WARM_TARGET_VS_RAW = 0.8


@dataclass
class Method:
    name: str
    group: str  # raw-direct, raw-buffered, ember, safetensors, torch.load, dram-pool
    files: list[Path]
    nbytes: int  # bytes it delivers (raw: bytes read; loaders: tensor bytes)
    run: Callable[[], object]  # load, touch every page, drop
    caches: tuple[Cache, ...] = ("cold", "warm")


@dataclass
class Result:
    method: str
    group: str
    cache: Cache
    nbytes: int
    samples_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.median_s / 1e9 if self.median_s > 0 else float("inf")


@dataclass(frozen=True)
class Target:
    name: str
    ratio: float
    target: float

    @property
    def met(self) -> bool:
        return self.ratio >= self.target


@dataclass
class LoadBenchReport:
    checkpoint: str
    partition_bytes: int
    tensor_bytes: int
    repeats: int
    results: list[Result]
    targets: list[Target]
    ember_cold_mode: str
    dram_pool: str
    notes: list[str]

    def find(self, method: str, cache: Cache) -> Result | None:
        return next((r for r in self.results if r.method == method and r.cache == cache), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "partition_bytes": self.partition_bytes,
            "tensor_bytes": self.tensor_bytes,
            "repeats": self.repeats,
            "cpu_count": os.cpu_count(),
            "ember_cold_mode": self.ember_cold_mode,
            "dram_pool": self.dram_pool,
            "results": [{**asdict(r), "median_s": r.median_s, "gbps": r.gbps} for r in self.results],
            "targets": [{**asdict(t), "met": t.met} for t in self.targets],
            "notes": self.notes,
        }


def unique_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Own-storage copies, one per distinct tensor (tied names kept once), as a
    safetensors or torch.save file of the same weights would hold them."""
    seen: set[tuple[object, ...]] = set()
    out = {}
    for name, t in tensors.items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous().clone()
    return out


def _dram_pool_hit(tensors: dict[str, torch.Tensor], nbytes: int) -> tuple[str, Callable[[], object]]:
    """Time to get a hit from the DRAM pool (ember.store.dram_pool.DramPool): lease,
    touch, release. Where that module is missing, a dict lookup stands in."""
    try:
        from ember.store.dram_pool import DramPool
    except ImportError:
        cache = {"bench": tensors}
        return "dict lookup (no ember.store.dram_pool here)", lambda: touch_pages(cache["bench"].values())

    pool = DramPool(2 * nbytes + (1 << 20))
    pool.insert("bench", tensors, nbytes).release()

    def pool_hit() -> None:
        lease = pool.acquire("bench")
        if lease is None:
            raise RuntimeError("the DRAM pool evicted the benchmark's entry")
        with lease:
            touch_pages(lease.tensors.values())

    return "DramPool", pool_hit


def _methods(
    ckpt: Path, parts: list[Path], work: Path, grid: Sequence[RawRead], direct_ok: bool
) -> tuple[list[Method], str, int]:
    index = read_index(ckpt)
    total = index.total_bytes
    tensors = unique_tensors(load_tensors(ckpt, io="buffered"))
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    from safetensors.torch import load_file, save_file

    st_path, pt_path = work / "model.safetensors", work / "model.pt"
    save_file(tensors, str(st_path))
    torch.save(tensors, pt_path)

    raw_buf = prepared_buffer(total)  # faulted in once, reused: set-up is not reading

    def raw(cfg: RawRead) -> Callable[[], None]:
        def read() -> None:
            raw_read(parts, raw_buf, cfg)
            touch_pages([raw_buf])

        return read

    def ember(io: Literal["auto", "direct", "buffered"]) -> Callable[[], object]:
        return lambda: touch_pages(load_tensors(ckpt, io=io).values())

    methods = [
        Method(
            cfg.name,
            f"raw-{cfg.mode}",
            parts,
            total,
            raw(cfg),
            ("cold",) if cfg.mode == "direct" else ("cold", "warm"),
        )
        for cfg in grid
        if direct_ok or cfg.mode == "buffered"
    ]
    methods += [Method("ember auto", "ember", parts, tensor_bytes, ember("auto"))]
    if direct_ok:
        methods += [Method("ember direct", "ember", parts, tensor_bytes, ember("direct"), ("cold",))]
    methods += [
        Method("ember buffered", "ember", parts, tensor_bytes, ember("buffered")),
        Method("safetensors load_file", "safetensors", [st_path], tensor_bytes,
               lambda: touch_pages(load_file(str(st_path)).values())),
        Method("torch.load", "torch.load", [pt_path], tensor_bytes,
               lambda: touch_pages(torch.load(pt_path, weights_only=True).values())),
    ]  # fmt: skip
    pool_kind, hit = _dram_pool_hit(tensors, tensor_bytes)
    methods.append(Method("dram pool hit", "dram-pool", [], tensor_bytes, hit, ("dram",)))
    return methods, pool_kind, tensor_bytes


def _timed(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def run_load_bench(
    ckpt: Path,
    *,
    repeats: int = 3,
    grid: Sequence[RawRead] | None = None,
    workdir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoadBenchReport:
    """Measure every method `repeats` times, round-robin, and summarise."""
    index = read_index(ckpt)
    parts = [ckpt / p.file for p in index.partitions]
    direct_ok = bool(parts) and supports_direct_io(parts[0])
    notes = [] if direct_ok else ["direct I/O is not supported on this filesystem: direct modes skipped"]
    work = Path(tempfile.mkdtemp(prefix=".ember-bench-", dir=workdir or ckpt.parent))
    try:
        methods, pool_kind, tensor_bytes = _methods(ckpt, parts, work, grid or raw_grid(), direct_ok)
        results = {(m.name, c): Result(m.name, m.group, c, m.nbytes) for m in methods for c in m.caches}
        steps, worst_residue = repeats * len(results), 0.0
        for m in methods:  # first calls pay for lazy imports and thread start-up: not measured
            if not m.group.startswith("raw"):
                m.run()
        for _ in range(repeats):
            for m in methods:
                for cache in m.caches:
                    if cache == "cold":
                        evict_page_cache(m.files)
                        worst_residue = max(worst_residue, max_resident_fraction(m.files))
                    elif cache == "warm":
                        warm_page_cache(m.files)
                    results[m.name, cache].samples_s.append(_timed(m.run))
                    if progress is not None:
                        progress(sum(len(r.samples_s) for r in results.values()), steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if worst_residue > 0.05:
        notes.append(f"eviction left up to {worst_residue:.0%} of a file cached: cold figures are optimistic")
    report = LoadBenchReport(
        str(ckpt),
        index.total_bytes,
        tensor_bytes,
        repeats,
        list(results.values()),
        [],
        "buffered",
        pool_kind,
        notes,
    )
    _summarise(report, ckpt, direct_ok)
    return report


def _best(report: LoadBenchReport, groups: Sequence[str], cache: Cache) -> Result | None:
    cands = [r for r in report.results if r.group in groups and r.cache == cache]
    return max(cands, key=lambda r: r.gbps, default=None)


def _summarise(report: LoadBenchReport, ckpt: Path, direct_ok: bool) -> None:
    direct, buffered = report.find("ember direct", "cold"), report.find("ember buffered", "cold")
    best_mode: Literal["direct", "buffered"] = (
        "direct" if direct and buffered and direct.gbps > buffered.gbps else "buffered"
    )
    report.ember_cold_mode = best_mode
    record_cold_mode(ckpt, best_mode)  # io="auto" follows this from now on
    ember_cold = report.find(f"ember {best_mode}", "cold")
    ember_warm = report.find("ember auto", "warm")
    raw_cold = _best(report, ("raw-direct", "raw-buffered"), "cold")
    raw_warm = _best(report, ("raw-buffered",), "warm")
    st_cold = report.find("safetensors load_file", "cold")
    if ember_cold and raw_cold:
        report.targets.append(
            Target(
                f"Ember cold / best raw cold ({raw_cold.method})",
                ember_cold.gbps / raw_cold.gbps,
                COLD_TARGET_VS_RAW,
            )
        )
    if ember_cold and st_cold:
        report.targets.append(
            Target(
                "Ember cold / safetensors cold", ember_cold.gbps / st_cold.gbps, COLD_TARGET_VS_SAFETENSORS
            )
        )
    if ember_warm and raw_warm:
        report.targets.append(
            Target(
                f"Ember warm / best raw buffered warm ({raw_warm.method})",
                ember_warm.gbps / raw_warm.gbps,
                WARM_TARGET_VS_RAW,
            )
        )
