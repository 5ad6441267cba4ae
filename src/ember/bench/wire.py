"""The registry tier against the wire: how fast the same files come over the same
HTTP server with a plain parallel ranged download into touched memory (no format,
no checksums, no order: the raw limit, best of a few clients, thread and range
settings), next to Ember's download into the DRAM pool (need order, every chunk
checksummed). The raw clients are httpx (bodies as `bytes`, copied into the
buffer) and http.client's readinto (the socket fills the buffer: Ember's own path,
store/http_ranges.py). The registry's files are dropped from the page cache before
every run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from ember.bench.page_cache import evict_page_cache, touch_pages
from ember.bench.raw_read import prepared_buffer
from ember.errors import EmberError
from ember.store.buffer import byte_view
from ember.store.format import read_index
from ember.store.http_ranges import Check, RangeReader
from ember.store.http_source import make_client
from ember.store.registry import HttpRegistry

MiB = 1 << 20
# (client, connections, range bytes)
RAW_GRID = (
    ("httpx", 4, 32 * MiB), ("httpx", 8, 32 * MiB),
    ("into", 2, 32 * MiB), ("into", 4, 8 * MiB), ("into", 4, 32 * MiB), ("into", 8, 32 * MiB),
)  # fmt: skip
EMBER = "ember into DRAM"


@dataclass(frozen=True)
class WireServer:
    """A server of the registry directory: its name and the base URL of checkpoints."""

    name: str  # "RegistryServer" or "nginx"
    url: str


@dataclass
class WireRow:
    server: str
    method: str  # "raw httpx t8 r32M", "raw into t4 r32M" or EMBER
    nbytes: int
    samples_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.median_s / 1e9

    def to_json(self) -> dict[str, object]:
        return {"server": self.server, "method": self.method, "nbytes": self.nbytes,
                "median_s": self.median_s, "gbps": self.gbps, "samples_s": self.samples_s}  # fmt: skip


def raw_download(
    client: httpx.Client | RangeReader,
    base: str,
    files: Sequence[tuple[str, int]],
    buf: torch.Tensor,
    *,
    threads: int,
    range_bytes: int,
) -> int:
    """GET every file in `range_bytes` ranges on `threads` threads into `buf`, back to
    back, with httpx or straight into the buffer (a RangeReader). Returns bytes received."""
    jobs, at = [], 0
    for rel, size in files:
        jobs += [(rel, off, at + off, min(range_bytes, size - off)) for off in range(0, size, range_bytes)]
        at += size
    whole = byte_view(buf)

    def run(job: tuple[str, int, int, int]) -> int:
        rel, off, pos, n = job
        url = f"{base}/{rel}"
        if isinstance(client, RangeReader):
            got = sum(client.read_into(url, off, whole[pos : pos + n], _partial_content(url)))
        else:
            got = _httpx_range(client, url, off, whole[pos : pos + n])
        if got != n:
            raise EmberError(f"raw download: {rel} ended early")
        return n

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return sum(pool.map(run, jobs))
    finally:
        whole.release()


def _httpx_range(client: httpx.Client, url: str, off: int, out: memoryview) -> int:
    at = 0
    headers = {"Range": f"bytes={off}-{off + len(out) - 1}"}
    with client.stream("GET", url, headers=headers) as resp:
        if resp.status_code != 206:
            raise EmberError(f"raw download: HTTP {resp.status_code} for {url}")
        for piece in resp.iter_raw():
            out[at : at + len(piece)] = piece
            at += len(piece)
    return at


def _partial_content(url: str) -> Check:
    def check(status: int, headers: Mapping[str, str]) -> int:
        if status != 206:
            raise EmberError(f"raw download: HTTP {status} for {url}")
        return 0

    return check


def _raw_run(
    client: httpx.Client | RangeReader,
    url: str,
    files: list[tuple[str, int]],
    buf: torch.Tensor,
    threads: int,
    range_bytes: int,
) -> Callable[[], object]:
    def run() -> int:
        raw_download(client, url, files, buf, threads=threads, range_bytes=range_bytes)
        return touch_pages([buf])

    return run


def ember_download(registry: HttpRegistry, name: str) -> None:
    """Ember's registry download of `name` into a DRAM buffer, start to last
    verified byte (the index and model files included), over a node's registry
    client (made once per node, as its connections are)."""
    stream = registry.open_stream(name)
    stream.start().wait()
    touch_pages([stream.buf])


def measure_wire(
    ckpt: Path, name: str, servers: Sequence[WireServer], repeats: int, evict: Callable[[], None]
) -> list[WireRow]:
    """Every server x (each raw setting, Ember's download), interleaved, `repeats` times;
    `evict()` drops the registry's files from the page cache before each run."""
    index = read_index(ckpt)
    files = [(f"{name}/{p.file}", p.size) for p in index.partitions]
    buf = prepared_buffer(index.total_bytes)
    rows: dict[tuple[str, str], WireRow] = {}
    registries: dict[str, HttpRegistry] = {}
    clients: dict[tuple[str, int], httpx.Client | RangeReader] = {
        (kind, t): make_client(t) if kind == "httpx" else RangeReader(t) for kind, t, _ in RAW_GRID
    }
    try:
        for _ in range(repeats + 1):  # round 0 warms connections and imports, and is dropped
            for server in servers:
                runs: list[tuple[str, Callable[[], object]]] = [
                    (f"raw {k} t{t} r{r // MiB}M", _raw_run(clients[k, t], server.url, files, buf, t, r))
                    for k, t, r in RAW_GRID
                ]
                registry = registries.setdefault(server.name, HttpRegistry(server.url))
                runs.append((EMBER, lambda r=registry: ember_download(r, name)))  # type: ignore[misc]
                for method, run in runs:
                    evict()
                    t0 = time.perf_counter()
                    run()
                    row = rows.setdefault(
                        (server.name, method), WireRow(server.name, method, index.total_bytes)
                    )
                    row.samples_s.append(time.perf_counter() - t0)
        for row in rows.values():
            row.samples_s = row.samples_s[1:]
    finally:
        for c in [*clients.values(), *registries.values()]:
            c.close()
    return list(rows.values())


def best_raw(rows: Sequence[WireRow], server: str) -> WireRow | None:
    return max(
        (r for r in rows if r.server == server and r.method != EMBER), key=lambda r: r.gbps, default=None
    )


def evicter(root: Path) -> Callable[[], None]:
    def evict() -> None:
        evict_page_cache(p for p in root.rglob("*.bin") if p.is_file())

    return evict
