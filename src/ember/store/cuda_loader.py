"""The CUDA path of the loader: disk -> pinned staging chunks -> device buffer.

Reader threads fill a ring of pinned chunks; as each lands (in order), its
host-to-device copy is queued on a side stream, so the copy of chunk i overlaps
the reads of the chunks after it. A slot is refilled only after its copy is done.
The result is views into one device buffer.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch

from ember.store.buffer import byte_view
from ember.store.checksum import check_chunks
from ember.store.format import CheckpointIndex
from ember.store.read_plan import ReadJob, open_partition, plan_reads, read_chunk, tensor_views

PAGE = 4096


def load_to_cuda(
    root: Path,
    index: CheckpointIndex,
    device: torch.device,
    *,
    io: Literal["direct", "buffered"],
    threads: int,
    chunk_bytes: int,
    verify: bool,
) -> dict[str, torch.Tensor]:
    bases, jobs = plan_reads(index, chunk_bytes)
    dev_buf = torch.empty(max(index.total_bytes, 1), dtype=torch.uint8, device=device)
    if jobs:
        paths = [root / p.file for p in index.partitions]
        fds = [open_partition(p, io) for p in paths]
        try:
            _pipeline(jobs, paths, fds, index, root, dev_buf, threads, verify)
        finally:
            for fd in fds:
                os.close(fd)
    return tensor_views(dev_buf, index, bases)


def _pipeline(
    jobs: list[ReadJob],
    paths: list[Path],
    fds: list[int],
    index: CheckpointIndex,
    root: Path,
    dev_buf: torch.Tensor,
    threads: int,
    verify: bool,
) -> None:
    slots = min(len(jobs), max(2, 2 * threads))
    size = max(j.length for j in jobs)
    # Pinned, page-aligned staging slots (direct I/O needs aligned buffers).
    staging = []
    for _ in range(slots):
        raw = torch.empty(size + PAGE, dtype=torch.uint8, pin_memory=True)
        skip = (-raw.data_ptr()) % PAGE
        staging.append(raw[skip : skip + size])
    copied = [torch.cuda.Event() for _ in range(slots)]
    stream = torch.cuda.Stream(device=dev_buf.device)

    def read(k: int) -> None:
        job = jobs[k]
        view = byte_view(staging[k % slots])[: job.length]
        read_chunk(fds[job.part], view, job.file_offset, paths[job.part])
        if verify:
            part = index.partitions[job.part]
            check_chunks(view, part, index.chunk_size, job.file_offset // index.chunk_size, root)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        reads: list[Future[None]] = [pool.submit(read, k) for k in range(slots)]
        for k, job in enumerate(jobs):
            reads[k].result()
            slot = k % slots
            with torch.cuda.stream(stream):
                dst = dev_buf[job.buf_offset : job.buf_offset + job.length]
                dst.copy_(staging[slot][: job.length], non_blocking=True)
                copied[slot].record(stream)
            if k + slots < len(jobs):
                # Chunk k + slots reuses this slot: wait for this copy, while the
                # other slots' reads go on in the pool.
                copied[slot].synchronize()
                reads.append(pool.submit(read, k + slots))
    stream.synchronize()
    torch.cuda.current_stream(dev_buf.device).wait_stream(stream)
