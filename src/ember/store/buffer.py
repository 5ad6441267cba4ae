"""Page-aligned host buffers, recycled once every tensor viewing them is gone.

Fresh anonymous memory costs a page fault per 4 KiB page on first touch (about
1 GB/s here), which would cap a load below the disk's speed. So buffers come from
`HostBufferPool`: anonymous mmaps (page-aligned, as direct I/O needs; huge pages
advised) that return to the pool when the last view of them is freed, and are
handed out again already faulted in. With CUDA, host buffers are pinned instead,
through torch's caching host allocator, which recycles them the same way.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from dataclasses import dataclass, field

import torch

PAGE = mmap.PAGESIZE
DEFAULT_IDLE_BUDGET = 4 << 30  # bytes of freed buffers kept for reuse


@dataclass
class _Region:
    mm: mmap.mmap
    size: int
    last_used: int = 0


@dataclass
class HostBufferPool:
    """Hands out page-aligned uint8 tensors; keeps up to `idle_budget` bytes of
    returned memory for the next load."""

    idle_budget: int = DEFAULT_IDLE_BUDGET
    _idle: list[_Region] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _clock: int = 0
    reused: int = 0

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of `nbytes` whose data pointer is page-aligned. Its memory
        comes back to the pool once every view of it has been freed."""
        nbytes = max(nbytes, 1)
        region = self._take(nbytes)
        lease = memoryview(region.mm)[:nbytes]
        # not at exit: views still alive then would keep their memory exported, and a
        # region closed under them raises BufferError
        weakref.finalize(lease, self._give_back, region).atexit = False
        return torch.frombuffer(lease, dtype=torch.uint8)

    def _take(self, nbytes: int) -> _Region:
        with self._lock:
            fits = [r for r in self._idle if nbytes <= r.size <= 2 * nbytes + (64 << 20)]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._idle.remove(region)
                self.reused += 1
                return region
        size = (nbytes + PAGE - 1) // PAGE * PAGE
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mm.madvise(mmap.MADV_HUGEPAGE)
        return _Region(mm, size)

    def _give_back(self, region: _Region) -> None:
        with self._lock:
            self._clock += 1
            region.last_used = self._clock
            self._idle.append(region)
            while sum(r.size for r in self._idle) > self.idle_budget:
                oldest = min(self._idle, key=lambda r: r.last_used)
                self._idle.remove(oldest)
                oldest.mm.close()

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(r.size for r in self._idle)

    def clear(self) -> None:
        with self._lock:
            for r in self._idle:
                r.mm.close()
            self._idle.clear()


_default_pool = HostBufferPool()


def host_buffer(nbytes: int, *, pinned: bool = False) -> torch.Tensor:
    """A page-aligned host buffer: pinned (CUDA's caching host allocator) or pooled."""
    if pinned:
        buf = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=True)
        skip = (-buf.data_ptr()) % PAGE
        return buf[skip : skip + nbytes]
    return _default_pool.acquire(nbytes)


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable byte memoryview of a contiguous CPU tensor's memory (no copy)."""
    return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]
