"""RegistryStream: a checkpoint downloaded from a registry straight into one host
buffer, in the order a forward pass needs it, served while it arrives.

The index and the small files (config, tokenizer) come first, checked against the
index. Then parallel ranged requests fill the buffer, each range a run of whole
checksum chunks, taken in need order (embeddings, layer 0, 1, ..., head): every
chunk is checked as it lands and only then marked arrived in the same LoadProgress
a disk stream uses, so each layer waits only for its own weights. A chunk that
fails its checksum is fetched again a bounded number of times; a transient failure
(5xx, a dropped connection) is retried with backoff; anything else fails the load
and every waiter with it. `on_chunk` sees each verified chunk (the disk copy is
written from the buffer behind the download, see ember.store.write_behind).

A partial disk copy of the same checkpoint left by an earlier download (a crash, a
registry that died) is read first: its chunks that verify arrive from the disk, in
need order, and only the others are downloaded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Collection, Generator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.errors import RegistryUnavailableError
from ember.store.buffer import byte_view, host_buffer
from ember.store.checksum import digest
from ember.store.format import INDEX_FILE, CheckpointIndex, PartitionEntry
from ember.store.loader import LoadProgress, in_need_order
from ember.store.read_plan import ReadJob, plan_reads, tensor_views
from ember.store.transfer import CheckpointSource, IntoSource, Progress, StreamSettings


@dataclass(frozen=True)
class _Range:
    """Checksum chunks [first, end) of partition `part`: one ranged request."""

    part: int
    first: int
    end: int


class _BadChunk(Exception):
    def __init__(self, k: int) -> None:
        self.k = k


def plan_ranges(
    index: CheckpointIndex,
    bases: list[int],
    range_bytes: int,
    have: Collection[tuple[int, int]] = (),
    connections: int = 1,
) -> list[_Range]:
    """Chunk runs of at most `range_bytes`, in need order: chunks ordered by need,
    then neighbours in one file joined while the run stays in that order. `have`:
    (partition, chunk) pairs already in the buffer, left out.

    With several `connections` the ranges in flight share the link, so a range of s
    chunks takes about s * connections chunks' time: one started near the end would
    finish with the last byte, and the layers in it would be computed after it. So a
    range holds at most 1 / (connections + 1) of the chunks left from its start,
    and no range finishes after the rest of the download would; the last ones are
    single chunks."""
    cs = index.chunk_size
    _, chunks = plan_reads(index, cs)
    per_range = max(1, range_bytes // cs)
    wanted = [
        job for job in in_need_order(index, bases, chunks) if (job.part, job.file_offset // cs) not in have
    ]
    out: list[_Range] = []
    cap = per_range
    for i, job in enumerate(wanted):
        k = job.file_offset // cs
        last = out[-1] if out else None
        if last is not None and last.part == job.part and last.end == k and last.end - last.first < cap:
            out[-1] = _Range(job.part, last.first, k + 1)
        else:
            out.append(_Range(job.part, k, k + 1))
            left = len(wanted) - i  # chunks from this one on
            cap = per_range if connections <= 1 else max(1, min(per_range, left // (connections + 1)))
    return out


class RegistryStream:
    """One checkpoint coming from `source`. Construction fetches and checks the index
    and the stored files (small); `start()` begins the download into `buf` and returns
    at once. `tensors` are views of `buf`: read one only after
    `progress.wait_for([tensor])`."""

    def __init__(
        self,
        source: CheckpointSource,
        settings: StreamSettings,
        *,
        pinned: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.source, self.settings = source, settings
        self.index_text = source.index_text()
        self.index = CheckpointIndex.from_json(self.index_text, source=source.where(INDEX_FILE))
        self.files = _read_files(source, self.index)
        self.buf = host_buffer(self.index.total_bytes, pinned=pinned)
        self.bases, self._chunks = plan_reads(self.index, self.index.chunk_size)
        self.progress = LoadProgress(self.buf, self._chunks, clock)
        self.tensors: dict[str, torch.Tensor] = tensor_views(self.buf, self.index, self.bases)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._done_bytes = 0
        self._on_chunk: Callable[[ReadJob], None] | None = None
        self._bytes: Progress | None = None
        self._partial: Path | None = None
        self.reused_bytes = 0  # read from a partial copy instead of downloaded

    @property
    def nbytes(self) -> int:
        return self.index.total_bytes

    def start(
        self,
        *,
        on_chunk: Callable[[ReadJob], None] | None = None,
        progress: Progress | None = None,
        partial: Path | None = None,
    ) -> LoadProgress:
        """Download in a background thread. `on_chunk(job)` runs (in a download thread)
        after each downloaded chunk is verified and marked arrived; `progress(done,
        total)` counts partition bytes. `partial`: a partial copy of this checkpoint
        whose verified chunks are read instead of downloaded (not passed to
        `on_chunk`: they are on that disk already). Returns the LoadProgress."""
        self._on_chunk, self._bytes, self._partial = on_chunk, progress, partial
        threading.Thread(target=self._run, name="ember-registry-stream", daemon=True).start()
        return self.progress

    def cancel(self) -> None:
        """Stop fetching: the load fails (its waiters get RegistryUnavailableError)."""
        self._stop.set()

    def _run(self) -> None:
        error: BaseException | None = None
        whole = byte_view(self.buf)
        try:
            have = self._reuse(whole) if self._partial is not None else set()
            ranges = plan_ranges(
                self.index, self.bases, self.settings.range_bytes, have, self.settings.connections
            )
            with ThreadPoolExecutor(max_workers=max(1, self.settings.connections)) as pool:
                # FIFO: the pool's threads take the ranges in need order
                futures = [pool.submit(self._fetch, r, whole) for r in ranges]
                for fut in futures:
                    try:
                        fut.result()
                    except BaseException as exc:
                        self._stop.set()  # the others stop at their next chunk
                        error = error or exc
            if error is None and self._stop.is_set():
                error = RegistryUnavailableError("the download was cancelled", detail=self.source.location)
        except BaseException as exc:  # handed to every waiter
            error = exc
        finally:
            whole.release()
        self.progress._finish(error)

    def _reuse(self, whole: memoryview) -> set[tuple[int, int]]:
        """Read the partial copy's chunks that verify into the buffer, in need order,
        and mark them arrived; returns them as (partition, chunk). A partial of another
        version of the checkpoint, or an unreadable one, gives nothing."""
        assert self._partial is not None
        try:
            if (self._partial / INDEX_FILE).read_text() != self.index_text:
                return set()
        except OSError:
            return set()
        cs = self.index.chunk_size
        have: set[tuple[int, int]] = set()
        fds: dict[int, int] = {}
        try:
            for job in in_need_order(self.index, self.bases, self._chunks):
                if self._stop.is_set():
                    break
                part = self.index.partitions[job.part]
                if job.part not in fds:
                    fds[job.part] = os.open(self._partial / part.file, os.O_RDONLY)
                view = whole[job.buf_offset : job.buf_offset + job.length]
                if os.preadv(fds[job.part], [view], job.file_offset) != job.length:
                    continue  # the partial ends before this chunk
                k = job.file_offset // cs
                if digest(view) == part.checksums[k]:
                    self._arrived(job, notify=False)
                    have.add((job.part, k))
                    self.reused_bytes += job.length
        except OSError:
            pass  # a partition file never written: download the rest
        finally:
            for fd in fds.values():
                os.close(fd)
        return have

    def _fetch(self, r: _Range, whole: memoryview) -> None:
        """Chunks [r.first, r.end): refetch from a chunk that fails its checksum (at
        most chunk_retries times), retry transient failures with backoff."""
        part = self.index.partitions[r.part]
        k, transient, corrupt = r.first, 0, 0
        while k < r.end and not self._stop.is_set():
            try:
                k = self._fetch_from(r.part, part, k, r.end, whole)
            except _BadChunk as bad:
                corrupt += 1
                k = bad.k
                if corrupt > self.settings.chunk_retries:
                    cs = self.index.chunk_size
                    end = min((k + 1) * cs, part.size)
                    raise self.source.bad_bytes(
                        f"checksum mismatch in {part.file} at bytes [{k * cs}, {end}) after {corrupt} tries",
                        detail=self.source.where(part.file),
                    ) from None
            except RegistryUnavailableError:
                transient += 1
                if transient > self.settings.retries:
                    raise
                self._stop.wait(self.settings.backoff_s * 2 ** (transient - 1))

    def _fetch_from(self, p: int, part: PartitionEntry, k: int, end: int, whole: memoryview) -> int:
        """Stream chunks [k, end) into the buffer, verifying each as it completes.
        Returns the next chunk to fetch (== end unless stopped)."""
        cs = self.index.chunk_size
        base = self.bases[p]
        start = k * cs
        stop = min(end * cs, part.size)
        at = start  # file offset of the next byte
        boundary = min((k + 1) * cs, part.size)
        out = whole[base + start : base + stop]
        with closing(self._land(part, start, out)) as landed:
            for n in landed:
                at += n
                while at >= boundary and k < end:
                    self._verify(p, part, k, whole)
                    k += 1
                    boundary = min((k + 1) * cs, part.size)
                    if self._stop.is_set():
                        return k
        if k < end:  # a source must deliver every byte or raise; this one did neither
            raise RegistryUnavailableError(
                f"{part.file}: the body ended early", detail=self.source.where(part.file)
            )
        return k

    def _land(self, part: PartitionEntry, start: int, out: memoryview) -> Generator[int]:
        """Bytes [start, start + len(out)) of the partition into `out`, yielding how
        many more landed: read straight into it where the source can, else copied."""
        if isinstance(self.source, IntoSource):
            yield from self.source.read_range_into(part.file, start, part.size, out)
            return
        at = 0
        with closing(self.source.read_range(part.file, start, len(out), part.size)) as pieces:
            for piece in pieces:
                n = min(len(piece), len(out) - at)  # a source never sends more; this guards the buffer
                out[at : at + n] = piece[:n] if n != len(piece) else piece
                at += n
                yield n

    def _verify(self, p: int, part: PartitionEntry, k: int, whole: memoryview) -> None:
        cs = self.index.chunk_size
        length = min(cs, part.size - k * cs)
        at = self.bases[p] + k * cs
        if digest(whole[at : at + length]) != part.checksums[k]:
            raise _BadChunk(k)
        self._arrived(ReadJob(p, k * cs, at, length), notify=True)

    def _arrived(self, job: ReadJob, *, notify: bool) -> None:
        """A verified chunk is in the buffer: waiters may read it; `notify`: it came
        from the registry (the disk copy still needs it)."""
        self.progress._arrive(job)
        if notify and self._on_chunk is not None:
            self._on_chunk(job)
        if self._bytes is not None:
            with self._lock:
                self._done_bytes += job.length
                self._bytes(self._done_bytes, self.index.total_bytes)


def _read_files(source: CheckpointSource, index: CheckpointIndex) -> dict[str, bytes]:
    """The checkpoint's stored files (config, tokenizer), each checked against the index."""
    out = {}
    for rel, entry in index.files.items():
        data = source.read_file(rel, entry.size)
        if len(data) != entry.size or digest(data) != entry.checksum:
            raise source.bad_bytes(f"checksum mismatch in {rel}", detail=source.where(rel))
        out[rel] = data
    return out
