"""copy_checkpoint: a verified, resumable, parallel copy of one checkpoint directory.

Every copy between tiers goes through here: registry -> disk cache, store ->
registry (push). A `CheckpointSource` streams byte ranges (a directory, or an HTTP
server with Range requests); the copy splits each partition into ranges of whole
checksum chunks, fetches them on several threads, checks every chunk's xxh3 before
writing it, and checks every file's size and checksum.

Partial state lives in `.<name>.partial/` beside the destination. It is renamed to
the destination only when everything is verified, so nothing partial is ever
visible there. A copy that is interrupted (an exception, a dropped connection, a
5xx answer) leaves the partial directory behind; the next copy re-hashes what it
holds and fetches only the chunks that do not verify. A registry that is wrong
(404 on a part, wrong size, bad bytes) leaves nothing: resuming from it makes no sense.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from ember.errors import (
    CheckpointError,
    CheckpointExistsError,
    EmberError,
    RegistryError,
    RegistryUnavailableError,
    StorageFullError,
)
from ember.store.checksum import digest, fsync_dir, fsync_tree
from ember.store.format import INDEX_FILE, CheckpointIndex, PartitionEntry

Progress = Callable[[int, int], None]  # (bytes_done, bytes_total)
DEFAULT_RANGE_BYTES = 32 << 20
DEFAULT_THREADS = 4

STREAM_CONNECTIONS = 8
STREAM_RANGE_BYTES = 32 << 20  # the best raw setting over loopback here (bench cold)


@dataclass(frozen=True)
class StreamSettings:
    """How a registry download runs: `connections` ranged requests at a time, each at
    most `range_bytes` (whole checksum chunks); `retries` transient failures per
    range (sleeping backoff_s * 2**i); `chunk_retries` refetches of a chunk whose
    checksum fails before the load fails."""

    connections: int = STREAM_CONNECTIONS
    range_bytes: int = STREAM_RANGE_BYTES
    retries: int = 3
    backoff_s: float = 0.5
    chunk_retries: int = 2


class CheckpointSource(Protocol):
    """Where a copy reads from. Errors name the file; where it is (`where`) is their
    detail, for the log, never for an API client."""

    location: str

    def index_text(self) -> str:
        """The checkpoint's index.json; CheckpointNotFoundError if there is none."""
        ...

    def read_range(self, rel: str, start: int, length: int, total: int) -> Generator[bytes]:
        """Exactly `length` bytes of file `rel` (which must be `total` bytes) from
        `start`, in pieces; raises (a RegistryError) if it cannot deliver them."""
        ...

    def read_file(self, rel: str, size: int) -> bytes:
        """The whole of file `rel`, expected to be `size` bytes."""
        ...

    def bad_bytes(self, message: str, *, detail: str | None = None) -> EmberError:
        """The error for bytes that fail their checksum, or a file of the wrong size."""
        ...

    def where(self, rel: str) -> str:
        """Where file `rel` is, for the log: a path, or a URL without credentials."""
        ...


@runtime_checkable
class IntoSource(Protocol):
    """A source that can also read a range straight into a caller's buffer."""

    def read_range_into(self, rel: str, start: int, total: int, out: memoryview) -> Iterator[int]:
        """Bytes [start, start + len(out)) of file `rel` (`total` bytes) into `out`,
        yielding how many more bytes landed (in order) as they arrive."""
        ...


@dataclass(frozen=True)
class _Job:
    """Chunks [first, end) of partition `part`, fetched as one range."""

    part: int
    first: int
    end: int


@contextmanager
def file_lock(path: Path, *, exclusive: bool = True, blocking: bool = True) -> Iterator[bool]:
    """flock on `path` (created if missing); yields whether the lock was taken. Works
    between processes and between threads (each call opens its own descriptor)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def partial_dir(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.partial"


def copy_checkpoint(
    source: CheckpointSource,
    dest: str | Path,
    *,
    progress: Progress | None = None,
    threads: int = DEFAULT_THREADS,
    range_bytes: int = DEFAULT_RANGE_BYTES,
    retries: int = 0,
    backoff_s: float = 0.5,
) -> Path:
    """Copy the checkpoint at `source` to directory `dest`, verified and atomically.

    Resumes from `.<dest>.partial/` if an earlier copy was interrupted. Concurrent
    copies to the same `dest` are serialised; the later one finds `dest` published
    and raises CheckpointExistsError, as it does if `dest` exists already.
    `progress(done, total)` runs after each verified chunk, from worker threads, one
    call at a time; if it raises, the copy stops and the exception propagates.
    Transient range failures are retried `retries` times, sleeping backoff_s * 2**i.
    """
    final = Path(dest)
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f".{final.name}.lock"):
        if final.exists():
            raise CheckpointExistsError(f"{final.name!r} already exists", detail=str(final))
        text = source.index_text()
        index = CheckpointIndex.from_json(text, source=source.where(INDEX_FILE))
        partial = partial_dir(final)
        try:
            copier = _Copier(source, index, partial, progress, retries, backoff_s)
            copier.prepare(text)
            copier.copy_partitions(threads, range_bytes)
            copier.copy_files()
            publish_partial(partial, final)
        except RegistryUnavailableError:
            raise
        except (RegistryError, CheckpointError):
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # the partial copy is what filled the disk: free it
                shutil.rmtree(partial, ignore_errors=True)
                raise StorageFullError(
                    f"no space left on device while copying {final.name!r}", detail=str(final)
                ) from exc
            raise
    return final


def publish_partial(partial: Path, final: Path) -> None:
    """fsync the partial copy's files and directories, then rename it to `final`."""
    fsync_tree([p for p in partial.rglob("*") if p.is_file()])
    for d in [partial, *(p for p in partial.rglob("*") if p.is_dir())]:
        fsync_dir(d)
    os.rename(partial, final)
    fsync_dir(final.parent)


class _Copier:
    def __init__(
        self,
        source: CheckpointSource,
        index: CheckpointIndex,
        partial: Path,
        progress: Progress | None,
        retries: int,
        backoff_s: float,
    ) -> None:
        self.source, self.index, self.partial = source, index, partial
        self.progress, self.retries, self.backoff_s = progress, retries, backoff_s
        self.total = index.stored_bytes
        self.done = 0
        self.missing: list[list[int]] = []  # per partition, the chunks still to fetch
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def prepare(self, index_text: str) -> None:
        """Start a partial copy, or keep the one there if it is of this same index,
        and find which of its chunks already verify."""
        index_path = self.partial / INDEX_FILE
        if self.partial.exists() and (not index_path.is_file() or index_path.read_text() != index_text):
            shutil.rmtree(self.partial)
        self.partial.mkdir(exist_ok=True)
        index_path.write_text(index_text)
        cs = self.index.chunk_size
        for part in self.index.partitions:
            path = self.partial / part.file
            with open(path, "a+b") as f:
                fresh = os.fstat(f.fileno()).st_size == 0
                if not fresh:
                    f.truncate(min(part.size, os.fstat(f.fileno()).st_size))
                reserve(f.fileno(), part.size)
                if fresh:
                    self.missing.append(list(range(len(part.checksums))))
                    continue
                missing = []
                for k, expected in enumerate(part.checksums):
                    f.seek(k * cs)
                    if digest(f.read(cs)) == expected:
                        self.done += min(cs, part.size - k * cs)
                    else:
                        missing.append(k)
            self.missing.append(missing)
        self._report(0)

    def jobs(self, range_bytes: int) -> list[_Job]:
        """Runs of missing chunks, at most `range_bytes` (whole chunks) each."""
        per_job = max(1, range_bytes // self.index.chunk_size)
        out = []
        for p, missing in enumerate(self.missing):
            run: list[int] = []
            for k in missing:
                if run and (k != run[-1] + 1 or len(run) == per_job):
                    out.append(_Job(p, run[0], run[-1] + 1))
                    run = []
                run.append(k)
            if run:
                out.append(_Job(p, run[0], run[-1] + 1))
        return out

    def copy_partitions(self, threads: int, range_bytes: int) -> None:
        jobs = self.jobs(range_bytes)
        if not jobs:
            return
        fds = [os.open(self.partial / p.file, os.O_WRONLY) for p in self.index.partitions]
        try:
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                futures = [pool.submit(self._run, job, fds[job.part]) for job in jobs]
                try:
                    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        fut.result()
                except BaseException:
                    self._stop.set()
                    for fut in futures:
                        fut.cancel()
                    raise
        finally:
            for fd in fds:
                os.close(fd)

    def _run(self, job: _Job, fd: int) -> None:
        """Fetch chunks [job.first, job.end), retrying transient failures from the
        first chunk not yet written."""
        part = self.index.partitions[job.part]
        k, attempt = job.first, 0
        while k < job.end and not self._stop.is_set():
            try:
                k = self._fetch_from(part, k, job.end, fd)
            except RegistryUnavailableError:
                attempt += 1
                if attempt > self.retries:
                    raise
                time.sleep(self.backoff_s * 2 ** (attempt - 1))

    def _fetch_from(self, part: PartitionEntry, k: int, end: int, fd: int) -> int:
        """Stream chunks [k, end) in; verify and write each as it completes. Returns
        the next chunk to fetch (== end unless stopped)."""
        cs = self.index.chunk_size
        start = k * cs
        length = min(end * cs, part.size) - start
        buf = bytearray(cs)
        view = memoryview(buf)
        filled = 0
        with closing(self.source.read_range(part.file, start, length, part.size)) as pieces:
            for piece in pieces:
                pv = memoryview(piece)
                while len(pv):
                    want = min(cs, part.size - k * cs)
                    take = min(len(pv), want - filled)
                    view[filled : filled + take] = pv[:take]
                    filled += take
                    pv = pv[take:]
                    if filled < want:
                        continue
                    chunk = view[:want]
                    if digest(chunk) != part.checksums[k]:
                        raise self.source.bad_bytes(
                            f"checksum mismatch in {part.file} at bytes [{k * cs}, {k * cs + want})",
                            detail=self.source.where(part.file),
                        )
                    _pwrite_all(fd, chunk, k * cs)
                    k, filled = k + 1, 0
                    self._report(want)
                    if self._stop.is_set() or k == end:
                        return k
        if k < end:  # a source must deliver every byte or raise; this one did neither
            raise RegistryUnavailableError(
                f"{part.file}: the body ended early", detail=self.source.where(part.file)
            )
        return k

    def copy_files(self) -> None:
        for rel, entry in self.index.files.items():
            path = self.partial / rel
            if (
                path.is_file()
                and path.stat().st_size == entry.size
                and digest(path.read_bytes()) == entry.checksum
            ):
                self._report(entry.size)
                continue
            data = self.source.read_file(rel, entry.size)
            if len(data) != entry.size or digest(data) != entry.checksum:
                raise self.source.bad_bytes(
                    f"checksum mismatch in {rel} ({len(data)} bytes, the index says {entry.size})",
                    detail=self.source.where(rel),
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            self._report(entry.size)

    def _report(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            if self.progress is not None:
                self.progress(self.done, self.total)


def reserve(fd: int, size: int) -> None:
    """Give the file its full size, allocating blocks so a full disk fails now."""
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
