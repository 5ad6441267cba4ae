"""The raw read limit: bulk reads of whole files, no format, no tensors, into one
buffer prepared as Ember's loader prepares its own (host_buffer, pre-faulted)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ember.store.buffer import byte_view, host_buffer

ReadMode = Literal["direct", "buffered"]
MiB = 1 << 20


@dataclass(frozen=True)
class RawRead:
    """One configuration of the raw reader."""

    mode: ReadMode
    threads: int
    chunk_bytes: int

    @property
    def name(self) -> str:
        return f"raw {self.mode} t{self.threads} c{self.chunk_bytes // MiB}M"


def raw_grid(
    modes: Sequence[ReadMode] = ("direct", "buffered"),
    threads: Sequence[int] = (1, 2, 4),
    chunks_mib: Sequence[int] = (4, 16, 64),
) -> list[RawRead]:
    return [RawRead(m, t, c * MiB) for m in modes for t in threads for c in chunks_mib]


def prepared_buffer(nbytes: int) -> torch.Tensor:
    """A page-aligned host buffer with every page already faulted in."""
    buf = host_buffer(nbytes)
    buf.fill_(0)
    return buf


def raw_read(files: Sequence[Path], buf: torch.Tensor, cfg: RawRead) -> int:
    """Read the files back to back into `buf` in `cfg.chunk_bytes` pieces on
    `cfg.threads` threads. Returns bytes read. Direct I/O needs every file size to be
    a multiple of 4 KiB (Ember's partitions are)."""
    flags = os.O_RDONLY | (os.O_DIRECT if cfg.mode == "direct" else 0)
    fds = [os.open(p, flags) for p in files]
    whole = byte_view(buf)
    jobs: list[tuple[int, int, int, int]] = []  # fd, file offset, buffer offset, length
    base = 0
    for fd, path in zip(fds, files, strict=True):
        size = path.stat().st_size
        jobs += [
            (fd, off, base + off, min(cfg.chunk_bytes, size - off)) for off in range(0, size, cfg.chunk_bytes)
        ]
        base += size
    if base > len(whole):
        raise ValueError(f"buffer of {len(whole)} bytes is too small for {base} bytes")

    def run(job: tuple[int, int, int, int]) -> int:
        fd, off, at, length = job
        view, done = whole[at : at + length], 0
        while done < length:
            n = os.preadv(fd, [view[done:]], off + done)
            if n == 0:
                raise OSError(f"short read at byte {off + done}")
            done += n
        return done

    try:
        with ThreadPoolExecutor(max_workers=cfg.threads) as pool:
            return sum(pool.map(run, jobs))
    finally:
        for fd in fds:
            os.close(fd)
        whole.release()
