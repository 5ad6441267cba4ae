"""Per-chunk checksums (xxh3-64): computed at save, checked on import, on every copy
between tiers, by `ember store verify`, and by loads that ask for it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

from ember.errors import CorruptCheckpointError
from ember.store.format import INDEX_FILE, CheckpointIndex, PartitionEntry, read_index


def digest(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


class ChunkHasher:
    """Streams bytes in and yields one digest per `chunk_size` bytes."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._hasher = xxhash.xxh3_64()
        self._filled = 0
        self.digests: list[str] = []

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), self.chunk_size - self._filled)
            self._hasher.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == self.chunk_size:
                self._close_chunk()

    def finish(self) -> list[str]:
        if self._filled:
            self._close_chunk()
        return self.digests

    def _close_chunk(self) -> None:
        self.digests.append(self._hasher.hexdigest())
        self._hasher.reset()
        self._filled = 0


def check_chunks(
    data: memoryview, part: PartitionEntry, chunk_size: int, first_chunk: int, source: Path
) -> None:
    """Compare the digests of `data`, which starts at chunk `first_chunk` of `part`."""
    for i in range(0, len(data), chunk_size):
        k = first_chunk + i // chunk_size
        if digest(data[i : i + chunk_size]) != part.checksums[k]:
            raise CorruptCheckpointError(
                f"checksum mismatch in {part.file} at bytes "
                f"[{k * chunk_size}, {min((k + 1) * chunk_size, part.size)})",
                detail=str(source / part.file),
            )


def check_sizes(root: Path, index: CheckpointIndex) -> None:
    """Every partition exists with exactly the size the index says (cheap: no reads)."""
    for part in index.partitions:
        path = root / part.file
        try:
            size = path.stat().st_size
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"partition missing: {part.file}", detail=str(path)) from exc
        if size != part.size:
            raise CorruptCheckpointError(
                f"partition {part.file} is {size} bytes, the index says {part.size} (truncated or altered)",
                detail=str(path),
            )


def _verify_range(path: Path, part: PartitionEntry, chunk_size: int, chunks: range) -> None:
    with open(path, "rb", buffering=0) as f:
        for k in chunks:
            f.seek(k * chunk_size)
            data = f.read(chunk_size)
            check_chunks(memoryview(data), part, chunk_size, k, path.parent)


def verify_checkpoint(path: str | Path, *, threads: int = 4) -> CheckpointIndex:
    """Read every byte of a checkpoint and compare it with the index's checksums.

    Raises CorruptCheckpointError naming the first bad file; returns the index."""
    root = Path(path)
    index = read_index(root)
    check_sizes(root, index)
    jobs: list[tuple[Path, PartitionEntry, range]] = []
    for part in index.partitions:
        n = len(part.checksums)
        step = max(1, n // threads)
        jobs += [(root / part.file, part, range(i, min(n, i + step))) for i in range(0, n, step)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for fut in [pool.submit(_verify_range, p, e, index.chunk_size, r) for p, e, r in jobs]:
            fut.result()
    for rel, entry in index.files.items():
        try:
            data = (root / rel).read_bytes()
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(f"file missing: {rel}", detail=str(root / rel)) from exc
        if len(data) != entry.size or digest(data) != entry.checksum:
            raise CorruptCheckpointError(f"checksum mismatch in {rel}", detail=str(root / rel))
    return index


def fsync_tree(paths: Iterable[Path]) -> None:
    """fsync files and then the directories that hold them."""
    dirs = set()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(p.parent)
    for d in dirs:
        fsync_dir(d)


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["INDEX_FILE", "ChunkHasher", "check_sizes", "digest", "verify_checkpoint"]
