"""Host buffers are recycled only once every tensor viewing them is gone."""

from __future__ import annotations

import gc
import subprocess
import sys

from ember.store.buffer import PAGE, HostBufferPool


def test_a_buffer_returns_to_the_pool_only_after_its_last_view_dies() -> None:
    pool = HostBufferPool(idle_budget=64 << 20)
    buf = pool.acquire(1 << 20)
    assert buf.data_ptr() % PAGE == 0
    view = buf[4096:8192].view(-1)
    first = buf.data_ptr()
    del buf
    gc.collect()
    assert pool.idle_bytes() == 0  # `view` still holds the memory
    other = pool.acquire(1 << 20)
    assert other.data_ptr() != first  # never handed out while a view lives
    del view
    gc.collect()
    assert pool.idle_bytes() >= 1 << 20
    again = pool.acquire(1 << 20)
    assert again.data_ptr() == first and pool.reused == 1
    del other, again


def test_idle_memory_is_bounded_by_the_budget() -> None:
    pool = HostBufferPool(idle_budget=3 << 20)
    bufs = [pool.acquire(1 << 20) for _ in range(6)]
    del bufs
    gc.collect()
    assert pool.idle_bytes() <= 3 << 20


def test_buffers_alive_at_exit_end_quietly() -> None:
    code = (
        "from ember.store.buffer import HostBufferPool\n"
        "pool = HostBufferPool(idle_budget=0)\n"
        "kept = pool.acquire(1 << 20)\n"  # still viewed when the interpreter exits
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr
