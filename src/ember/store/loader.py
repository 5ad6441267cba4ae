"""load_tensors: bulk, chunked, multi-threaded reads of whole partitions into one
page-aligned buffer, then every tensor as a zero-copy view. No per-tensor reads and
no parsing beyond the small index on the load path.

stream_tensors returns the views at once and reads behind them, in the order a
forward pass needs them; its LoadProgress says which bytes have arrived (read and
checksum-checked), so an engine can start computing with the first layers while
the last ones are still on their way."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch

from ember.errors import CorruptCheckpointError
from ember.store.buffer import byte_view, host_buffer
from ember.store.checksum import check_chunks, check_sizes
from ember.store.format import CheckpointIndex, read_index
from ember.store.read_plan import ReadJob, open_partition, plan_reads, read_chunk, tensor_views

IoMode = Literal["auto", "direct", "buffered"]
DEFAULT_THREADS = 4
DEFAULT_CHUNK_BYTES = 16 << 20


_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")


def need_rank(name: str) -> int:
    """When a forward pass needs tensor `name`: embeddings first (0), then layer i
    (i + 1), then everything else (final norm, output head) last."""
    m = _LAYER.search(name)
    if m is not None:
        return int(m.group(1)) + 1
    return 0 if "embed" in name else 1 << 30


def in_need_order(index: CheckpointIndex, bases: Sequence[int], jobs: list[ReadJob]) -> list[ReadJob]:
    """`jobs` sorted by the earliest need of any tensor they hold (stable: file order
    within a rank). A checkpoint written layer by layer keeps its order. Tensors may
    share bytes (tied weights stored once under two names, such as SmolLM2's
    embeddings and head): a job takes the earliest need of every tensor over it."""
    by_start = sorted(range(len(jobs)), key=lambda i: jobs[i].buf_offset)
    starts = [jobs[i].buf_offset for i in by_start]
    ranks = [1 << 31] * len(jobs)  # bytes under no tensor (alignment) come last
    for name, e in index.tensors.items():
        start = bases[e.partition] + e.offset
        end, rank = start + e.nbytes, need_rank(name)
        k = max(0, bisect_right(starts, start) - 1)  # the job holding the tensor's first byte
        while k < len(starts) and starts[k] < end:
            i = by_start[k]
            if starts[k] + jobs[i].length > start:
                ranks[i] = min(ranks[i], rank)
            k += 1
    return [jobs[i] for i in sorted(range(len(jobs)), key=ranks.__getitem__)]


class LoadProgress:
    """Which bytes of a streaming load's buffer have arrived (read and, when the load
    verifies, checksum-checked). `wait_for(tensors)` blocks until theirs have, or
    raises the load's error; `wait()` waits for the whole load. Thread-safe."""

    def __init__(self, buf: torch.Tensor, jobs: Sequence[ReadJob], clock: Callable[[], float]) -> None:
        self._base = buf.data_ptr()
        self._nbytes = buf.numel()
        ordered = sorted(jobs, key=lambda j: j.buf_offset)
        self._starts = [j.buf_offset for j in ordered]
        self._slot = {j.buf_offset: i for i, j in enumerate(ordered)}
        self._arrived = [False] * len(ordered)
        self._missing = len(ordered)
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[LoadProgress], None]] = []
        self._cond = threading.Condition()
        self._clock = clock
        self.started = clock()
        self.finished: float | None = None

    @property
    def complete(self) -> bool:
        """Every byte arrived (False while loading and after a failure)."""
        return self.finished is not None and self._error is None

    @property
    def error(self) -> BaseException | None:
        return self._error

    @property
    def seconds(self) -> float | None:
        """Start to last byte, once finished."""
        return None if self.finished is None else self.finished - self.started

    def wait(self, timeout: float | None = None) -> None:
        """Until the whole load has arrived; raises its error (TimeoutError on timeout)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished is not None, timeout):
                raise TimeoutError("the checkpoint is still loading")
            self._raise()

    def wait_for(self, tensors: Iterable[torch.Tensor]) -> None:
        """Until the bytes under `tensors` have arrived; tensors outside this load's
        buffer are ready by definition. Raises the load's error."""
        if self.complete:
            return
        ranges = [r for t in tensors if (r := self._span(t)) is not None]
        with self._cond:
            self._cond.wait_for(lambda: self.finished is not None or all(self._has(a, b) for a, b in ranges))
            self._raise()

    def add_done_callback(self, fn: Callable[[LoadProgress], None]) -> None:
        """Run `fn(self)` once the load finishes or fails (at once if it has)."""
        with self._cond:
            if self.finished is None:
                self._callbacks.append(fn)
                return
        fn(self)

    def _span(self, t: torch.Tensor) -> tuple[int, int] | None:
        if t.device.type != "cpu" or t.numel() == 0:
            return None
        start = t.data_ptr() - self._base
        extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1
        if not 0 <= start < self._nbytes:
            return None
        return start, start + extent * t.element_size()

    def _has(self, start: int, end: int) -> bool:
        i = max(0, bisect_right(self._starts, start) - 1)
        while i < len(self._starts) and self._starts[i] < end:
            if not self._arrived[i]:
                return False
            i += 1
        return True

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _arrive(self, job: ReadJob) -> None:
        with self._cond:
            i = self._slot[job.buf_offset]
            if not self._arrived[i]:
                self._arrived[i] = True
                self._missing -= 1
            self._cond.notify_all()

    def _finish(self, error: BaseException | None) -> None:
        """Record the outcome, run the done callbacks, then release the waiters: a
        waiter sees what the callbacks did (a failed copy already discarded)."""
        with self._cond:
            if error is None and self._missing:
                error = CorruptCheckpointError(f"{self._missing} chunks of the load never arrived")
            self._error = error
            end = self._clock()
        while True:
            with self._cond:
                callbacks, self._callbacks = self._callbacks, []
                if not callbacks:
                    self.finished = end
                    self._cond.notify_all()
                    return
            for fn in callbacks:
                fn(self)


def supports_direct_io(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


_libc = ctypes.CDLL(None, use_errno=True)


def resident_fraction(path: Path, samples: int = 64, window_pages: int = 16) -> float:
    """Estimated fraction of a file's pages in the page cache: mincore over `samples`
    windows spread across the file (a whole-file scan costs ~13 ms per 500 MB, a
    fifth of a warm load). 0.0 for an empty file."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    window = min(window_pages, pages)
    starts = sorted({(pages - window) * i // max(1, samples - 1) for i in range(samples)})
    vec = (ctypes.c_ubyte * window)()
    resident = checked = 0
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        for first in starts:
            length = min(window * page, size - first * page)
            if _libc.mincore(ctypes.c_void_p(base + first * page), ctypes.c_size_t(length), vec) != 0:
                return 0.0
            n = (length + page - 1) // page
            resident += sum(vec[i] & 1 for i in range(n))
            checked += n
    return resident / checked


def choose_io(root: Path, index: CheckpointIndex, io: IoMode) -> Literal["direct", "buffered"]:
    """Buffered when the bytes are already in the page cache (a copy from RAM beats
    any disk read) or direct I/O is unsupported (tmpfs); otherwise direct, which skips
    the page cache's extra copy, unless the measured profile says buffered wins here."""
    if io != "auto":
        return io
    first = root / index.partitions[0].file
    if not supports_direct_io(first):
        return "buffered"
    if resident_fraction(first) > 0.5:
        return "buffered"
    from ember.store.io_profile import preferred_cold_mode

    return preferred_cold_mode(root)


def read_partitions(
    root: Path,
    index: CheckpointIndex,
    buf: torch.Tensor,
    *,
    io: Literal["direct", "buffered"],
    threads: int,
    chunk_bytes: int,
    verify: bool,
    on_chunk: Callable[[ReadJob], None] | None = None,
    jobs: Sequence[ReadJob] | None = None,
) -> list[int]:
    """Fill `buf` (uint8, page-aligned, CPU) with every partition. Returns the
    partition base offsets. `on_chunk` runs in the reading thread after each chunk;
    `jobs` (plan_reads' chunks, reordered) sets the order chunks are read in."""
    bases, planned = plan_reads(index, chunk_bytes)
    jobs = planned if jobs is None else jobs
    paths = [root / p.file for p in index.partitions]
    fds = [open_partition(p, io) for p in paths]
    whole = byte_view(buf)

    def run(job: ReadJob) -> None:
        view = whole[job.buf_offset : job.buf_offset + job.length]
        read_chunk(fds[job.part], view, job.file_offset, paths[job.part])
        if verify:
            part = index.partitions[job.part]
            check_chunks(view, part, index.chunk_size, job.file_offset // index.chunk_size, root)
        if on_chunk is not None:
            on_chunk(job)

    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for fut in [pool.submit(run, job) for job in jobs]:
                fut.result()
    finally:
        for fd in fds:
            os.close(fd)
        whole.release()
    return bases


def load_tensors(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    verify: bool = False,
    io: IoMode = "auto",
    threads: int = DEFAULT_THREADS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    index: CheckpointIndex | None = None,
) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors as views into one buffer that the result owns.

    Reads the files on every call. `index` is the checkpoint's index when the caller
    has read it already (parsing one costs ~20-50 ms; pass it, not a stale one). A
    plain load checks file sizes and index bounds; `verify=True` also checks every
    chunk's checksum as it arrives. On CUDA, chunk i's host-to-device copy overlaps
    the read of the chunks after it.
    """
    root = Path(path)
    if index is None:
        index = read_index(root)
    check_sizes(root, index)
    mode = choose_io(root, index, io) if index.partitions else "buffered"
    dev = torch.device(device)
    if dev.type == "cuda":
        from ember.store.cuda_loader import load_to_cuda

        return load_to_cuda(
            root, index, dev, io=mode, threads=threads, chunk_bytes=chunk_bytes, verify=verify
        )
    buf = host_buffer(index.total_bytes)
    bases = read_partitions(
        root, index, buf, io=mode, threads=threads, chunk_bytes=chunk_bytes, verify=verify
    )
    return tensor_views(buf, index, bases)


def stream_tensors(
    path: str | Path,
    *,
    verify: bool = True,
    io: IoMode = "auto",
    threads: int = DEFAULT_THREADS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    index: CheckpointIndex | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[dict[str, torch.Tensor], LoadProgress]:
    """Every tensor as a view into one buffer, returned before the bytes are in it,
    and the LoadProgress of the reads that fill it behind them (CPU only).

    Chunks are read in need order (embeddings, layer 0, layer 1, ..., head), on
    `threads` threads, each verified before it counts as arrived. Read a tensor only
    after `progress.wait_for([tensor])`; the buffer stays alive while the views do."""
    root = Path(path)
    if index is None:
        index = read_index(root)
    check_sizes(root, index)
    mode = choose_io(root, index, io) if index.partitions else "buffered"
    buf = host_buffer(index.total_bytes)
    bases, jobs = plan_reads(index, chunk_bytes)
    progress = LoadProgress(buf, jobs, clock)
    ordered = in_need_order(index, bases, jobs)

    def read() -> None:
        error: BaseException | None = None
        try:
            read_partitions(
                root, index, buf, io=mode, threads=threads, chunk_bytes=chunk_bytes, verify=verify,
                on_chunk=progress._arrive, jobs=ordered,
            )  # fmt: skip
        except BaseException as exc:  # handed to every waiter
            error = exc
        progress._finish(error)

    threading.Thread(target=read, name="ember-load", daemon=True).start()
    return tensor_views(buf, index, bases), progress
