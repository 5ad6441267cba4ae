"""BlockManager: a bounded pool of fixed-size KV blocks and a block table per sequence.

The scheduler talks to it only through KVAllocator (can_allocate / allocate / free by
sequence id); block ids and tables are for the model runner.
"""

from __future__ import annotations

from typing import Protocol


class KVAllocator(Protocol):
    """What a scheduler may ask of the KV cache. `num_tokens` is the total number of
    tokens the sequence will hold in the cache (computed so far + this iteration)."""

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool: ...

    def allocate(self, seq_id: str, num_tokens: int) -> None: ...

    def free(self, seq_id: str) -> None: ...

    @property
    def usage(self) -> float: ...


class SwapKVAllocator(KVAllocator, Protocol):
    """A KVAllocator that can also park a sequence's blocks in host memory
    (ember.engine.swapper.KVSwapper). Counts are in blocks; ids never leave it."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def host_free_blocks(self) -> int:
        """Blocks of host swap space still free."""
        ...

    def blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Device blocks the sequence lacks to hold num_tokens (all of them if swapped out)."""
        ...

    def num_device_blocks(self, seq_id: str) -> int: ...

    def is_swapped(self, seq_id: str) -> bool: ...

    def can_swap_out(self, seq_id: str) -> bool: ...

    def swap_out(self, seq_id: str) -> None: ...

    def can_swap_in(self, seq_id: str) -> bool: ...

    def swap_in(self, seq_id: str) -> None: ...


class OutOfBlocksError(RuntimeError):
    """allocate() without room: a scheduler bug, never a user's."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # a stack, so recently freed (cache-warm) blocks are reused first
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (the KV cache usage metric)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _missing(self, seq_id: str, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_allocate(self, seq_id: str, num_tokens: int) -> bool:
        return self._missing(seq_id, num_tokens) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        """Grow the sequence's table to hold num_tokens tokens (never shrinks)."""
        missing = self._missing(seq_id, num_tokens)
        if missing > len(self._free):
            raise OutOfBlocksError(f"{seq_id}: needs {missing} blocks, {len(self._free)} free")
        table = self._tables.setdefault(seq_id, [])
        for _ in range(missing):
            table.append(self._free.pop())

    def free(self, seq_id: str) -> None:
        table = self._tables.pop(seq_id, None)
        if table:
            self._free.extend(reversed(table))

    def block_table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])
