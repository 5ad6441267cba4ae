"""How a checkpoint is read: the chunks that fill one buffer, one chunk's read, and
the tensors as views of the filled buffer. Shared by the CPU loader (ember.store.loader)
and the CUDA one (ember.store.cuda_loader)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import CorruptCheckpointError
from ember.store.format import CheckpointIndex, dtype_from_name

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ReadJob:
    """One chunk: `length` bytes of partition `part` at `file_offset`, into the
    buffer at `buf_offset`."""

    part: int
    file_offset: int
    buf_offset: int
    length: int


def plan_reads(index: CheckpointIndex, chunk_bytes: int) -> tuple[list[int], list[ReadJob]]:
    """Partition base offsets in the buffer, and the chunks that fill it."""
    chunk_bytes = max(1, chunk_bytes // index.chunk_size) * index.chunk_size
    bases, jobs, base = [], [], 0
    for p, part in enumerate(index.partitions):
        bases.append(base)
        for off in range(0, part.size, chunk_bytes):
            jobs.append(ReadJob(p, off, base + off, min(chunk_bytes, part.size - off)))
        base += part.size
    return bases, jobs


def open_partition(path: Path, mode: str) -> int:
    """A read-only descriptor; `mode` "direct" bypasses the page cache (O_DIRECT)."""
    flags = os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0)
    return os.open(path, flags)


def read_chunk(fd: int, view: memoryview, offset: int, source: Path) -> None:
    """Fill `view` from byte `offset` of `fd`; CorruptCheckpointError if the file ends first."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CorruptCheckpointError(
                f"{source.name} ended early at byte {offset + done}", detail=str(source)
            )
        done += n


def tensor_views(buf: torch.Tensor, index: CheckpointIndex, bases: Sequence[int]) -> dict[str, torch.Tensor]:
    """Every tensor of the index as a view into `buf` (no copies)."""
    out = {}
    for name, e in index.tensors.items():
        dtype = dtype_from_name(e.dtype)
        start = bases[e.partition] + e.offset
        usable = e.nbytes // dtype.itemsize * dtype.itemsize
        flat = buf[start : start + usable].view(dtype)
        out[name] = flat.as_strided(e.shape, e.stride, flat.storage_offset() + e.elem_offset)
    return out
