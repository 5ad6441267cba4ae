"""The remote registry: where nodes fetch checkpoints they hold in no nearer tier.

A registry is a directory (a shared filesystem) or an HTTP(S) base URL serving such
a directory. `<base>/<name>/` is a checkpoint directory exactly as the store holds
it. Fetches are parallel ranged reads, verified chunk by chunk, resumable, and
published atomically (see ember.store.transfer).
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable
from urllib.parse import quote

from ember.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    EmberError,
    RegistryError,
)
from ember.store.catalog import check_name
from ember.store.checksum import digest
from ember.store.format import INDEX_FILE, CheckpointIndex
from ember.store.http_ranges import RangeReader, shown_url
from ember.store.http_source import HttpSource, make_client
from ember.store.local import is_store_root
from ember.store.transfer import (
    DEFAULT_RANGE_BYTES,
    DEFAULT_THREADS,
    CheckpointSource,
    Progress,
    StreamSettings,
    copy_checkpoint,
)

if TYPE_CHECKING:  # torch is imported only once a download into memory starts
    from ember.store.registry_stream import RegistryStream

PIECE = 4 << 20  # bytes read from a file at a time


@runtime_checkable
class Registry(Protocol):
    location: str

    def fetch(self, name: str, dest: Path, *, progress: Progress | None = None) -> Path:
        """Copy checkpoint `name` to directory `dest` (atomically, verified); returns dest."""
        ...

    def push(self, src: Path, name: str) -> None:
        """Copy the checkpoint directory `src` into the registry as `name`."""
        ...

    def exists(self, name: str) -> bool: ...

    def size(self, name: str) -> int:
        """Total bytes of the checkpoint (partitions and files), from its index."""
        ...

    def read_files(self, name: str, prefix: str = "") -> dict[str, bytes]:
        """The checkpoint's stored files (config, tokenizer; never its tensors) whose
        paths start with `prefix`, by path, each checked against the index."""
        ...

    def open_stream(self, name: str, *, pinned: bool = False) -> RegistryStream:
        """Checkpoint `name` as a download into one host buffer (pinned for CUDA):
        its index and stored files fetched and checked, its tensors not yet (see
        RegistryStream.start)."""
        ...


class DirectorySource:
    """A checkpoint directory on a (possibly shared) filesystem. `bad` is the error
    class for wrong bytes: RegistryError when it is a registry's copy,
    CorruptCheckpointError when it is a local checkpoint being pushed."""

    def __init__(self, root: Path, *, bad: type[EmberError] = RegistryError) -> None:
        self.root = root
        self.location = str(root)
        self._bad = bad

    def index_text(self) -> str:
        try:
            return (self.root / INDEX_FILE).read_text()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise CheckpointNotFoundError(
                f"no checkpoint at {self.root.name!r} (no {INDEX_FILE})", detail=str(self.root)
            ) from exc

    def read_range(self, rel: str, start: int, length: int, total: int) -> Generator[bytes]:
        fd = self._open(rel, total)
        try:
            done = 0
            while done < length:
                data = os.pread(fd, min(PIECE, length - done), start + done)
                if not data:
                    raise self._bad(f"{rel} ended early at byte {start + done}", detail=self.where(rel))
                done += len(data)
                yield data
        finally:
            os.close(fd)

    def read_range_into(self, rel: str, start: int, total: int, out: memoryview) -> Iterator[int]:
        """Bytes [start, start + len(out)) of `rel` read straight into `out` (no copy
        through Python bytes), yielding how many more landed, a piece at a time."""
        fd = self._open(rel, total)
        try:
            done = 0
            while done < len(out):
                n = os.preadv(fd, [out[done : done + min(PIECE, len(out) - done)]], start + done)
                if n == 0:
                    raise self._bad(f"{rel} ended early at byte {start + done}", detail=self.where(rel))
                done += n
                yield n
        finally:
            os.close(fd)

    def _open(self, rel: str, total: int) -> int:
        """File `rel` open for reading, checked to be `total` bytes."""
        path = self.root / rel
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as exc:
            raise self._bad(f"{rel} is missing", detail=str(path)) from exc
        size = os.fstat(fd).st_size
        if size != total:
            os.close(fd)
            raise self._bad(f"{rel} is {size} bytes, the index says {total}", detail=str(path))
        return fd

    def read_file(self, rel: str, size: int) -> bytes:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError as exc:
            raise self._bad(f"{rel} is missing", detail=self.where(rel)) from exc

    def bad_bytes(self, message: str, *, detail: str | None = None) -> EmberError:
        return self._bad(message, detail=detail)

    def where(self, rel: str) -> str:
        return str(self.root / rel)


class DirectoryRegistry:
    """A registry that is a directory: `<root>/<name>/` per checkpoint. The local
    store's own directory is one (`ember serve` without --registry): its errors then
    say "the store"."""

    def __init__(
        self, root: str | Path, *, threads: int = DEFAULT_THREADS, stream: StreamSettings | None = None
    ) -> None:
        self.root = Path(root).expanduser()
        self.location = str(self.root)
        self.threads = threads
        self.stream_settings = stream or StreamSettings(connections=threads)
        self.described = "the store" if is_store_root(self.root) else "the registry"

    def _source(self, name: str) -> DirectorySource:
        return DirectorySource(self.root / check_name(name))

    def _in(self, name: str) -> AbstractContextManager[None]:
        return _in_registry(self.described, self.location, name)

    def fetch(self, name: str, dest: Path, *, progress: Progress | None = None) -> Path:
        with self._in(name):
            return copy_checkpoint(self._source(name), dest, progress=progress, threads=self.threads)

    def open_stream(self, name: str, *, pinned: bool = False) -> RegistryStream:
        from ember.store.registry_stream import RegistryStream

        with self._in(name):
            return RegistryStream(self._source(name), self.stream_settings, pinned=pinned)

    def push(self, src: Path, name: str) -> None:
        """Copy checkpoint directory `src` to `<root>/<name>/`, checking every chunk
        and file as it is copied; CheckpointExistsError if the name is taken."""
        source = DirectorySource(Path(src), bad=CorruptCheckpointError)
        copy_checkpoint(source, self.root / check_name(name), threads=self.threads)

    def exists(self, name: str) -> bool:
        return (self.root / check_name(name) / INDEX_FILE).is_file()

    def size(self, name: str) -> int:
        with self._in(name):
            return _index(self._source(name)).stored_bytes

    def read_files(self, name: str, prefix: str = "") -> dict[str, bytes]:
        with self._in(name):
            return _read_files(self._source(name), prefix)

    def names(self) -> list[str]:
        """Checkpoints in the registry, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if not p.name.startswith(".") and (p / INDEX_FILE).is_file()
        )


class HttpRegistry:
    """A registry served over HTTP(S): `<url>/<name>/index.json` and so on. Read-only."""

    def __init__(
        self,
        url: str,
        *,
        connections: int = DEFAULT_THREADS,
        range_bytes: int = DEFAULT_RANGE_BYTES,
        retries: int = 3,
        backoff_s: float = 0.5,
        described: str = "the registry",
        stream: StreamSettings | None = None,
    ) -> None:
        self.location = url.rstrip("/")
        # what errors call it: "the store" when it serves a store (Ray mode's default)
        self.described = described
        self.connections, self.range_bytes = connections, range_bytes
        self.retries, self.backoff_s = retries, backoff_s
        self.stream_settings = stream or StreamSettings(retries=retries, backoff_s=backoff_s)
        self._client = make_client(max(connections, self.stream_settings.connections))
        self._ranges = RangeReader(self.stream_settings.connections)  # downloads into DRAM

    def _source(self, name: str) -> HttpSource:
        return HttpSource(self._client, f"{self.location}/{quote(check_name(name))}", self._ranges)

    def fetch(self, name: str, dest: Path, *, progress: Progress | None = None) -> Path:
        with _in_registry(self.described, shown_url(self.location), name):
            return copy_checkpoint(
                self._source(name),
                dest,
                progress=progress,
                threads=self.connections,
                range_bytes=self.range_bytes,
                retries=self.retries,
                backoff_s=self.backoff_s,
            )

    def open_stream(self, name: str, *, pinned: bool = False) -> RegistryStream:
        from ember.store.registry_stream import RegistryStream

        with _in_registry(self.described, shown_url(self.location), name):
            return RegistryStream(self._source(name), self.stream_settings, pinned=pinned)

    def push(self, src: Path, name: str) -> None:
        raise RegistryError(
            "this registry is read-only (HTTP); push to a directory registry", detail=shown_url(self.location)
        )

    def exists(self, name: str) -> bool:
        return self._source(name).exists()

    def size(self, name: str) -> int:
        with _in_registry(self.described, shown_url(self.location), name):
            return _index(self._source(name)).stored_bytes

    def read_files(self, name: str, prefix: str = "") -> dict[str, bytes]:
        with _in_registry(self.described, shown_url(self.location), name):
            return _read_files(self._source(name), prefix)

    def close(self) -> None:
        self._client.close()
        self._ranges.close()

    def __enter__(self) -> HttpRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def _in_registry(described: str, location: str, name: str) -> Iterator[None]:
    """Turn "no checkpoint at <dir>" into "checkpoint <name> is not in the registry"
    (or "the store"); where it looked is the detail, for the log."""
    try:
        yield
    except CheckpointNotFoundError as exc:
        hint = " (see `ember store ls`)" if described == "the store" else ""
        raise CheckpointNotFoundError(
            f"checkpoint {name!r} is not in {described}{hint}", detail=exc.detail or location
        ) from exc


def _index(source: CheckpointSource) -> CheckpointIndex:
    return CheckpointIndex.from_json(source.index_text(), source=source.where(INDEX_FILE))


def _read_files(source: CheckpointSource, prefix: str) -> dict[str, bytes]:
    out = {}
    for rel, entry in _index(source).files.items():
        if rel.startswith(prefix):
            data = source.read_file(rel, entry.size)
            if len(data) != entry.size or digest(data) != entry.checksum:
                raise source.bad_bytes(f"checksum mismatch in {rel}", detail=source.where(rel))
            out[rel] = data
    return out


def open_registry(location: str, *, described: str = "the registry") -> Registry:
    """A registry from a directory path (or file:// URL) or an http(s):// base URL.
    `described`: what an http one's errors call it (a directory says for itself)."""
    if location.startswith(("http://", "https://")):
        return HttpRegistry(location, described=described)
    return DirectoryRegistry(location.removeprefix("file://"))


def fetch_url(url: str, dest: Path, *, progress: Progress | None = None) -> Path:
    """Copy the one checkpoint directory at `url` (http(s) or a path) to `dest`."""
    if url.startswith(("http://", "https://")):
        with make_client(DEFAULT_THREADS) as client:
            return copy_checkpoint(HttpSource(client, url), dest, progress=progress, retries=3)
    return copy_checkpoint(DirectorySource(Path(url.removeprefix("file://"))), dest, progress=progress)
