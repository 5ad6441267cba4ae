"""KVSwapper: budgets, byte counts, and transfers that overlap iterations that do not need them."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ember.engine.block_manager import BlockManager
from ember.engine.swapper import KVSwapper
from tests.engine.fakes import FakeKVCache


class GatedCache(FakeKVCache):
    """Copies out wait until `gate` opens: a transfer that is still running."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self.gate = threading.Event()

    def copy_blocks_out(self, block_ids: Sequence[int], *, pin: bool = False) -> torch.Tensor:
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return super().copy_blocks_out(block_ids, pin=pin)


def write(cache: FakeKVCache, swapper: KVSwapper, seq_id: str, tokens: list[int]) -> None:
    """What an iteration does: take blocks, wait for transfers touching them, write."""
    swapper.allocate(seq_id, len(tokens))
    swapper.prepare([seq_id])
    for pos, t in enumerate(tokens):
        block = swapper.blocks.block_table(seq_id)[pos // cache.block_size]
        cache.tokens[block * cache.block_size + pos % cache.block_size] = t


def read(cache: FakeKVCache, swapper: KVSwapper, seq_id: str, n: int) -> list[int]:
    table = swapper.blocks.block_table(seq_id)
    return [
        int(cache.tokens[table[p // cache.block_size] * cache.block_size + p % cache.block_size])
        for p in range(n)
    ]


def test_swap_out_and_in_restores_contents_in_other_blocks_and_counts_bytes() -> None:
    cache = FakeKVCache(8, 4)
    swapper = KVSwapper(BlockManager(8, 4), cache, host_blocks=4)
    write(cache, swapper, "a", list(range(10, 20)))  # 3 blocks
    before = list(swapper.blocks.block_table("a"))
    swapper.swap_out("a")
    assert swapper.num_free_blocks == 8 and swapper.host_free_blocks == 1 and swapper.is_swapped("a")
    write(cache, swapper, "b", [7] * 12)  # b takes a's old blocks and overwrites them
    swapper.swap_in("a")
    swapper.prepare(["a"])
    assert swapper.blocks.block_table("a") != before
    assert read(cache, swapper, "a", 10) == list(range(10, 20))
    assert (swapper.num_swaps_out, swapper.num_swaps_in) == (1, 1)
    assert swapper.swap_bytes_out == swapper.swap_bytes_in == 3 * cache.block_bytes
    swapper.close()


def test_the_host_budget_bounds_swapping_out() -> None:
    cache = FakeKVCache(8, 4)
    swapper = KVSwapper(BlockManager(8, 4), cache, host_blocks=2, background=False)
    write(cache, swapper, "a", [1] * 9)  # 3 blocks > 2 of host space
    write(cache, swapper, "b", [1] * 8)
    assert not swapper.can_swap_out("a") and swapper.can_swap_out("b")
    swapper.swap_out("b")
    assert not swapper.can_swap_out("b")  # already out
    swapper.free("b")
    assert swapper.host_free_blocks == 2


def test_a_transfer_in_flight_stalls_only_the_iteration_that_needs_its_blocks() -> None:
    cache = GatedCache(8, 4)
    swapper = KVSwapper(BlockManager(8, 4), cache, host_blocks=8)
    write(cache, swapper, "a", [3] * 8)
    write(cache, swapper, "other", [4] * 4)
    swapper.swap_out("a")  # the copy now waits on the gate
    swapper.prepare(["other"])  # returns at once: other's block is not being copied
    assert swapper.pending_blocks()
    swapper.allocate("b", 8)  # b is handed a's old blocks
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (swapper.prepare(["b"]), done.set()))
    waiter.start()
    assert not done.wait(timeout=0.2)  # b's iteration must wait for the copy out of its blocks
    cache.gate.set()
    waiter.join(timeout=30)
    assert done.is_set() and not swapper.pending_blocks()
    swapper.close()
