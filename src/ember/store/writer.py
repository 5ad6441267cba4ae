"""save_tensors: lay tensors out in aligned partitions and publish the directory atomically."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ember.errors import CheckpointExistsError, StorageFullError
from ember.store.buffer import byte_view
from ember.store.checksum import ChunkHasher, digest, fsync_dir, fsync_tree
from ember.store.format import (
    ALIGNMENT,
    CHUNK_SIZE,
    INDEX_FILE,
    PARTITION_SIZE,
    CheckpointIndex,
    FileEntry,
    PartitionEntry,
    TensorEntry,
    align_up,
    dtype_name,
    partition_name,
)
from ember.store.scratch import old_copy, temporary_dir

FileSource = bytes | str | Path
Progress = Callable[[int, int], None]  # (bytes written, bytes to write)


@dataclass
class _Blob:
    data: torch.Tensor  # uint8, contiguous, on CPU
    partition: int = 0
    offset: int = 0


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


def _extent(t: torch.Tensor) -> int:
    """Elements spanned by t in its storage, from its first element."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))


def _plan(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[list[_Blob], dict[str, tuple[int, TensorEntry]]]:
    """Group tensors by shared storage; each group becomes one blob."""
    groups: dict[object, list[str]] = {}
    for name, t in tensors.items():
        dtype_name(t.dtype)  # reject unsupported dtypes before writing anything
        storage = t.untyped_storage()
        key: object = (t.device, storage.data_ptr()) if storage.nbytes() else name
        groups.setdefault(key, []).append(name)

    blobs: list[_Blob] = []
    entries: dict[str, tuple[int, TensorEntry]] = {}
    for names in groups.values():
        blob_id = len(blobs)
        if len(names) == 1:
            t = tensors[names[0]]
            data = _as_bytes(t)
            shape = tuple(t.shape)
            entries[names[0]] = (
                blob_id,
                _entry(t, data.numel(), shape, _contiguous_strides(shape), 0),
            )
        else:
            # Shared storage (tied weights, views of one tensor): store the covered
            # span once and keep each tensor's own view of it.
            ts = [tensors[n] for n in names]
            starts = [t.storage_offset() * t.element_size() for t in ts]
            ends = [s + _extent(t) * t.element_size() for s, t in zip(starts, ts, strict=True)]
            lo = min(starts) // 16 * 16  # 16 = the largest itemsize, so every view stays aligned
            hi = max(ends)
            whole = torch.empty(0, dtype=torch.uint8, device=ts[0].device)
            whole.set_(ts[0].untyped_storage(), 0, (ts[0].untyped_storage().nbytes(),), (1,))
            data = whole[lo:hi].detach().cpu().contiguous()
            for n, t, s in zip(names, ts, starts, strict=True):
                elem_offset = (s - lo) // t.element_size()
                entries[n] = (
                    blob_id,
                    _entry(t, data.numel(), tuple(t.shape), tuple(t.stride()), elem_offset),
                )
        blobs.append(_Blob(data))
    return blobs, entries


def _entry(
    t: torch.Tensor, nbytes: int, shape: tuple[int, ...], stride: tuple[int, ...], elem_offset: int
) -> TensorEntry:
    return TensorEntry(0, 0, nbytes, dtype_name(t.dtype), shape, stride, elem_offset)


def _write_partitions(
    blobs: list[_Blob], root: Path, partition_size: int, progress: Progress | None = None
) -> list[PartitionEntry]:
    # Assign offsets: back to back, aligned, a new file once one passes partition_size.
    layout: list[list[_Blob]] = [[]]
    offset = 0
    for blob in blobs:
        if offset >= partition_size and layout[-1]:
            layout.append([])
            offset = 0
        blob.partition, blob.offset = len(layout) - 1, offset
        layout[-1].append(blob)
        offset = align_up(offset + blob.data.numel())

    partitions = []
    zeros = bytes(ALIGNMENT)
    total, written = sum(b.data.numel() for b in blobs), 0
    for i, group in enumerate(layout):
        path = root / partition_name(i)
        hasher = ChunkHasher(CHUNK_SIZE)
        size = 0
        with open(path, "wb") as f:
            for blob in group:
                view = byte_view(blob.data)
                f.write(view)
                hasher.update(view)
                pad = align_up(blob.data.numel()) - blob.data.numel()
                f.write(zeros[:pad])
                hasher.update(memoryview(zeros[:pad]))
                size = blob.offset + blob.data.numel() + pad
                written += blob.data.numel()
                if progress is not None:
                    progress(written, total)
        partitions.append(PartitionEntry(path.name, size, tuple(hasher.finish())))
    return partitions


def _write_file(path: Path, source: FileSource) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, bytes):
        path.write_bytes(source)
    else:
        shutil.copyfile(source, path)


@contextmanager
def atomic_directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success fsync it and rename it to
    `path`, so a reader sees the whole directory or nothing. On failure remove it. A
    process killed meanwhile leaves an orphan that the next open of the store removes
    (ember.store.scratch)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise CheckpointExistsError(f"{final.name!r} already exists", detail=str(final))
    with temporary_dir(final) as tmp:
        try:
            yield tmp
            fsync_tree([p for p in tmp.rglob("*") if p.is_file()])
            for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
                fsync_dir(d)
            _publish(tmp, final, overwrite)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StorageFullError(
                    f"no space left on device while writing {final.name!r}", detail=str(final)
                ) from exc
            raise


def _publish(tmp: Path, final: Path, overwrite: bool) -> None:
    old = None
    if overwrite and final.exists():
        old = old_copy(tmp)  # under tmp's lock: no cleaner takes it while we may need it back
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if old is not None:
            os.rename(old, final)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise CheckpointExistsError(
                f"{final.name!r} already exists (written concurrently)", detail=str(final)
            ) from exc
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    metadata: Mapping[str, str] | None = None,
    files: Mapping[str, FileSource] | None = None,
    overwrite: bool = False,
    partition_size: int = PARTITION_SIZE,
    progress: Progress | None = None,
) -> CheckpointIndex:
    """Save tensors as an Ember checkpoint directory at `path`, atomically.

    `files` maps relative paths (e.g. "model/config.json") to bytes or source files
    stored beside the tensors. `progress(done, total)` counts tensor bytes written
    (then the directory is fsynced and renamed into place). Raises CheckpointExistsError if `path` exists and
    `overwrite` is false, StorageFullError if the disk fills (nothing is left behind).
    """
    blobs, planned = _plan(tensors)
    with atomic_directory(path, overwrite=overwrite) as tmp:
        partitions = _write_partitions(blobs, tmp, partition_size, progress)
        entries = {}
        for name, (blob_id, e) in planned.items():
            blob = blobs[blob_id]
            entries[name] = TensorEntry(
                blob.partition, blob.offset, e.nbytes, e.dtype, e.shape, e.stride, e.elem_offset
            )
        file_entries = {}
        for rel, source in (files or {}).items():
            _write_file(tmp / rel, source)
            data = (tmp / rel).read_bytes()
            file_entries[rel] = FileEntry(len(data), digest(data))
        index = CheckpointIndex(tuple(partitions), entries, dict(metadata or {}), file_entries)
        index.validate()
        (tmp / INDEX_FILE).write_text(index.to_json())
    return index
