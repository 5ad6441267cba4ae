"""WriteBehind: the disk-cache copy of a registry download, written from the very
buffer the download fills, off the load's critical path.

A thread of its own (at a lower CPU priority) takes each chunk as the download
verifies it and writes it into `.<name>.partial/` beside the cache entry, the same
partial directory a plain fetch uses (ember.store.transfer). Once every chunk is in,
it fsyncs and renames the partial to the entry: the copy appears complete and
verified or not at all. A download that fails, or a crash, leaves the partial for
the next fetch to resume; a registry that sent wrong bytes leaves nothing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from ember.errors import RegistryError, RegistryUnavailableError
from ember.store.buffer import byte_view
from ember.store.format import INDEX_FILE, CheckpointIndex
from ember.store.loader import LoadProgress
from ember.store.read_plan import ReadJob
from ember.store.transfer import file_lock, partial_dir, publish_partial, reserve

_LOW_PRIORITY = 10  # nice increment of the writer thread: the download and the engine come first


class WriteBehind:
    """Writes the checkpoint held in `buf` to directory `final`. `begin` runs first in
    the writer thread, holding the caller's locks (it may make room); `published` runs
    once the copy is in place. `done` is set when the writer ends either way; `error`
    says why it did not publish (None if it did, or found `final` there already)."""

    def __init__(
        self,
        final: Path,
        index_text: str,
        index: CheckpointIndex,
        files: dict[str, bytes],
        buf: torch.Tensor,
        *,
        locks: Callable[[], contextlib.AbstractContextManager[object]],
        published: Callable[[], None],
    ) -> None:
        self.final, self.index_text, self.index, self.files = final, index_text, index, files
        self.buf = buf  # kept alive until written, even if the pool drops its entry
        self._locks, self._published = locks, published
        self._queue: queue.SimpleQueue[ReadJob | LoadProgress] = queue.SimpleQueue()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ember-write-behind", daemon=True)

    def start(self, loading: LoadProgress) -> None:
        """Start writing; the copy is published once `loading` completes."""
        loading.add_done_callback(self._queue.put)
        self.thread.start()

    def chunk(self, job: ReadJob) -> None:
        """A verified chunk of the buffer, ready to write (called by the download)."""
        self._queue.put(job)

    def _run(self) -> None:
        with contextlib.suppress(OSError):  # a lower priority is a courtesy, not a need
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOW_PRIORITY)
        try:
            with self._locks(), file_lock(self.final.parent / f".{self.final.name}.lock"):
                if (self.final / INDEX_FILE).is_file():
                    self._drain()  # another process published it meanwhile
                    return
                self._write()
        except BaseException as exc:
            self.error = exc
        finally:
            self.buf = torch.empty(0, dtype=torch.uint8)
            self.done.set()

    def _drain(self) -> None:
        while not isinstance(self._queue.get(), LoadProgress):
            pass

    def _write(self) -> None:
        partial = partial_dir(self.final)
        index_path = partial / INDEX_FILE
        if partial.exists() and (not index_path.is_file() or index_path.read_text() != self.index_text):
            shutil.rmtree(partial)  # a partial of another version
        partial.mkdir(parents=True, exist_ok=True)
        index_path.write_text(self.index_text)
        fds = []
        try:
            for part in self.index.partitions:
                fd = os.open(partial / part.file, os.O_WRONLY | os.O_CREAT, 0o644)
                fds.append(fd)
                reserve(fd, part.size)
            outcome = self._write_chunks(fds)
        finally:
            for fd in fds:
                os.close(fd)
        if outcome.error is not None:
            if isinstance(outcome.error, RegistryError) and not isinstance(
                outcome.error, RegistryUnavailableError
            ):
                shutil.rmtree(partial, ignore_errors=True)  # wrong bytes: nothing worth resuming
            raise outcome.error
        for rel, data in self.files.items():
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            (partial / rel).write_bytes(data)
        publish_partial(partial, self.final)
        self._published()

    def _write_chunks(self, fds: list[int]) -> LoadProgress:
        """Write chunks as they come until the download ends; returns its progress."""
        whole = byte_view(self.buf)
        try:
            while True:
                item = self._queue.get()
                if isinstance(item, LoadProgress):
                    return item
                view = whole[item.buf_offset : item.buf_offset + item.length]
                offset = item.file_offset
                while len(view):
                    n = os.pwrite(fds[item.part], view, offset)
                    view, offset = view[n:], offset + n
        finally:
            whole.release()
