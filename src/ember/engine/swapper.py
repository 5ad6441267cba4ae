"""KVSwapper: the device block pool plus a host swap space, with transfers in the background.

The scheduler sees only SwapKVAllocator (sequence ids and block counts). Swapping a
sequence out frees its device blocks at once and copies them to host memory in the
background; swapping in takes fresh device blocks and copies back. Transfers run on
one worker thread in submission order (on CUDA, on their own stream, after an event
that marks the end of the computation queued so far), so a copy out always reads a
block before a later copy in or iteration overwrites it. Before an iteration the
engine calls `prepare()` with the batch's sequences: it waits only for the transfers
that touch those sequences' blocks; every other transfer keeps running beside the
model's computation.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ember.engine.block_manager import BlockManager


class BlockMover(Protocol):
    """Copies blocks between the device cache and host memory (ember.engine.kv_cache.KVCache)."""

    @property
    def block_bytes(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def copy_blocks_out(self, block_ids: Sequence[int], *, pin: bool = False) -> Any: ...

    def copy_blocks_in(self, block_ids: Sequence[int], data: Any) -> None: ...


@dataclass
class _Transfer:
    future: concurrent.futures.Future[Any]
    blocks: frozenset[int]  # device blocks it reads (out) or writes (in)


@dataclass
class _HostCopy:
    data: concurrent.futures.Future[Any]  # what copy_blocks_out returned, once done
    num_blocks: int


class KVSwapper:
    """Device blocks (a BlockManager) and `host_blocks` blocks of host swap space.

    `background=False` runs every transfer inline (deterministic tests).
    """

    def __init__(
        self, blocks: BlockManager, mover: BlockMover | None, host_blocks: int, *, background: bool = True
    ) -> None:
        if host_blocks > 0 and mover is None:
            raise ValueError("swapping needs a cache that can copy blocks out and in")
        self.blocks = blocks
        self.mover = mover
        self.host_blocks = max(0, host_blocks)
        self.background = background
        self._host: dict[str, _HostCopy] = {}
        self._host_used = 0
        self._pending: list[_Transfer] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._stream: Any = None  # a torch.cuda.Stream on CUDA
        self.num_swaps_out = 0
        self.num_swaps_in = 0
        self.swap_bytes_out = 0
        self.swap_bytes_in = 0

    # -- KVAllocator ----------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    @property
    def usage(self) -> float:
        return self.blocks.usage

    @property
    def host_free_blocks(self) -> int:
        return self.host_blocks - self._host_used

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= self.blocks.num_free_blocks

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        if seq_id in self._host:
            self.swap_in(seq_id)
        self.blocks.allocate(seq_id, num_tokens)

    def free(self, seq_id: str) -> None:
        self.blocks.free(seq_id)
        copy = self._host.pop(seq_id, None)
        if copy is not None:
            self._host_used -= copy.num_blocks

    # -- swapping -------------------------------------------------------------------

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        held = len(self.blocks.block_table(seq_id))
        return max(0, self.blocks.blocks_for(num_tokens) - held)

    def num_device_blocks(self, seq_id: str) -> int:
        return len(self.blocks.block_table(seq_id))

    def is_swapped(self, seq_id: str) -> bool:
        return seq_id in self._host

    def can_swap_out(self, seq_id: str) -> bool:
        n = self.num_device_blocks(seq_id)
        return 0 < n <= self.host_free_blocks and seq_id not in self._host

    def swap_out(self, seq_id: str) -> None:
        """Free the sequence's device blocks; their contents move to host memory."""
        assert self.can_swap_out(seq_id) and self.mover is not None
        table = list(self.blocks.block_table(seq_id))
        mover, pin = self.mover, self._on_cuda
        future = self._submit(lambda: mover.copy_blocks_out(table, pin=pin), table)
        self._host[seq_id] = _HostCopy(future, len(table))
        self._host_used += len(table)
        self.blocks.free(seq_id)
        self.num_swaps_out += 1
        self.swap_bytes_out += len(table) * mover.block_bytes

    def can_swap_in(self, seq_id: str) -> bool:
        copy = self._host.get(seq_id)
        return copy is not None and copy.num_blocks <= self.blocks.num_free_blocks

    def swap_in(self, seq_id: str) -> None:
        """Give the sequence device blocks again and copy its contents back into them."""
        assert self.can_swap_in(seq_id) and self.mover is not None
        copy = self._host.pop(seq_id)
        self._host_used -= copy.num_blocks
        self.blocks.allocate(seq_id, copy.num_blocks * self.blocks.block_size)
        table = list(self.blocks.block_table(seq_id))
        mover = self.mover
        # the worker runs transfers in order, so the copy out has finished by now
        self._submit(lambda: mover.copy_blocks_in(table, copy.data.result()), table)
        self.num_swaps_in += 1
        self.swap_bytes_in += len(table) * mover.block_bytes

    # -- the engine's side ----------------------------------------------------------

    def prepare(self, seq_ids: Iterable[str]) -> None:
        """Wait for the transfers that touch these sequences' blocks (the next batch)."""
        self._pending = [t for t in self._pending if not t.future.done()]
        if not self._pending:
            return
        needed = {b for s in seq_ids for b in self.blocks.block_table(s)}
        for t in self._pending:
            if t.blocks & needed:
                t.future.result()

    def pending_blocks(self) -> set[int]:
        """Device blocks that transfers still in flight read or write."""
        return {b for t in self._pending if not t.future.done() for b in t.blocks}

    def close(self) -> None:
        """Finish the transfers in flight and stop the worker."""
        for t in self._pending:
            t.future.result()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @property
    def _on_cuda(self) -> bool:
        return self.mover is not None and self.mover.device.type == "cuda"

    def _submit(self, work: Callable[[], Any], blocks: Sequence[int]) -> concurrent.futures.Future[Any]:
        if not self.background:
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_result(work())
            return future
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ember-swap")
        if self._on_cuda:
            work = self._on_side_stream(work)
        future = self._executor.submit(work)
        self._pending.append(_Transfer(future, frozenset(blocks)))
        return future

    def _on_side_stream(self, work: Callable[[], Any]) -> Callable[[], Any]:
        """Run `work` on the swap stream once the computation queued so far is done
        (the blocks it reads were last written, or the blocks it writes last read, there)."""
        assert self.mover is not None
        device = self.mover.device
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        stream = self._stream
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(device))

        def run() -> Any:
            with torch.cuda.stream(stream):
                stream.wait_event(ready)
                result = work()
                stream.synchronize()  # done means the bytes are in place
            return result

        return run
