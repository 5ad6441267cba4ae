"""The page cache and a benchmark's honesty: make files cold, make them warm, and
make sure a loader's whole output was really read before its clock stops."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ember.store.loader import resident_fraction

PAGE = 4096
_WARM_CHUNK = 64 << 20


def evict_page_cache(paths: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache: fsync (only clean pages can be
    dropped), then posix_fadvise(POSIX_FADV_DONTNEED) over the whole file."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(paths: Iterable[Path]) -> None:
    """Read the files through the page cache so the next read is served from RAM."""
    buf = bytearray(_WARM_CHUNK)
    for path in paths:
        if resident_fraction(path) >= 0.999:
            continue
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def max_resident_fraction(paths: Iterable[Path]) -> float:
    return max((resident_fraction(p) for p in paths), default=0.0)


def touch_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Read one byte of every 4 KiB page of every distinct storage behind `tensors`
    (lazily mapped loaders only do their I/O here). Returns the sum, so nothing is
    skipped."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        u8 = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
        total += int(u8[::PAGE].sum()) + int(u8[-1])
    return total
