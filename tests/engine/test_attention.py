"""Paged attention against a plain per-sequence softmax attention."""

from __future__ import annotations

import pytest
import torch

from ember.engine.attention import AttentionMetadata, AttentionPlan, paged_attention
from tests.engine.helpers import BlockPool

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 8, 4


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """One sequence, all of its tokens: q [n_new, H, D] at the end of k, v [n_all, KV, D]."""
    n_new, n_all = q.shape[0], k.shape[0]
    k = k.repeat_interleave(HEADS // KV_HEADS, 1)
    v = v.repeat_interleave(HEADS // KV_HEADS, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / DIM**0.5
    qpos = torch.arange(n_all - n_new, n_all)[:, None]
    kpos = torch.arange(n_all)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n_new, HEADS * DIM)


def new_cache(num_blocks: int) -> torch.Tensor:
    # never-written memory may hold anything, NaN included: attention must not read it unmasked
    cache = torch.full((num_blocks + 1, BLOCK, 2, KV_HEADS, DIM), float("nan"), dtype=torch.float64)
    cache[num_blocks] = 0
    return cache


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_batch_matches_reference(window: int | None) -> None:
    torch.manual_seed(0)
    # (context, new): decode, decode, whole prefill, chunk of a prefill, another decode
    shapes = [(7, 1), (12, 1), (0, 9), (6, 5), (3, 1)]
    full = [c + n for c, n in shapes]
    keys = [torch.randn(t, KV_HEADS, DIM, dtype=torch.float64) for t in full]
    values = [torch.randn(t, KV_HEADS, DIM, dtype=torch.float64) for t in full]
    queries = [torch.randn(n, HEADS, DIM, dtype=torch.float64) for _, n in shapes]
    cache = new_cache(40)
    pool = BlockPool(40)
    tables = []
    for (c, n), k, v in zip(shapes, keys, values, strict=True):
        blocks = [pool.take() for _ in range(-(-(c + n) // BLOCK))]
        tables.append(blocks)
        # earlier iterations wrote the context (a fresh block is zeroed at its first write)
        for p in range(c):
            if p % BLOCK == 0:
                cache[blocks[p // BLOCK]] = 0
            cache[blocks[p // BLOCK], p % BLOCK, 0] = k[p]
            cache[blocks[p // BLOCK], p % BLOCK, 1] = v[p]
    meta = AttentionMetadata.build([n for _, n in shapes], [c for c, _ in shapes], tables, BLOCK)
    plan = AttentionPlan.build(meta, BLOCK, HEADS // KV_HEADS, [window], torch.device("cpu"), 40)
    out = paged_attention(
        torch.cat(queries),
        torch.cat([k[c:] for (c, _), k in zip(shapes, keys, strict=True)]),
        torch.cat([v[c:] for (c, _), v in zip(shapes, values, strict=True)]),
        cache,
        plan,
        window,
    )
    assert not out.isnan().any()
    want = torch.cat([reference(q, k, v, window) for q, k, v in zip(queries, keys, values, strict=True)])
    torch.testing.assert_close(out, want)


def test_metadata_build_maps_slots_through_block_tables() -> None:
    meta = AttentionMetadata.build([2, 1], [3, 4], [[5, 9], [2, 7]], block_size=4)
    # seq 0 positions 3, 4 -> block 5 slot 3, block 9 slot 0; seq 1 position 4 -> block 7 slot 0
    assert meta.slot_mapping.tolist() == [5 * 4 + 3, 9 * 4, 7 * 4]
    assert meta.block_tables.dtype == torch.int32
    assert meta.num_tokens == 3


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize(("context", "new"), [(9, 1), (8, 1), (6, 5)])
def test_one_sequence_on_consecutive_blocks_reads_the_cache_in_place(
    window: int | None, context: int, new: int
) -> None:
    """Batch 1 on blocks 3, 4, 5, ... (what the block manager hands out to a lone
    sequence) takes the no-gather path; it must agree with the reference too."""
    torch.manual_seed(1)
    total = context + new
    keys = torch.randn(total, KV_HEADS, DIM, dtype=torch.float64)
    values = torch.randn(total, KV_HEADS, DIM, dtype=torch.float64)
    query = torch.randn(new, HEADS, DIM, dtype=torch.float64)
    cache = new_cache(12)
    blocks = list(range(3, 3 + -(-total // BLOCK)))
    for p in range(context):
        if p % BLOCK == 0:
            cache[blocks[p // BLOCK]] = 0
        cache[blocks[p // BLOCK], p % BLOCK, 0] = keys[p]
        cache[blocks[p // BLOCK], p % BLOCK, 1] = values[p]
    meta = AttentionMetadata.build([new], [context], [blocks], BLOCK)
    plan = AttentionPlan.build(meta, BLOCK, HEADS // KV_HEADS, [window], torch.device("cpu"), 12)
    assert plan.groups[0].block_run == (3, total)
    out = paged_attention(query, keys[context:], values[context:], cache, plan, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out, reference(query, keys, values, window))
