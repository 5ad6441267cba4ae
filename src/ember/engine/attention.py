"""Attention over a paged KV cache, one code path for prefill, chunked prefill and decode.

Each iteration's batch is a list of sequences, each with `context_len` tokens already
cached and `query_len` new tokens. New tokens' K/V are written into the cache at
`slot_mapping`; each sequence then attends causally over context + new tokens.

Sequences with the same query_len are run together as one batched
`scaled_dot_product_attention` call (all decodes form one group), so the Python work
per layer is per group, never per token. Grouped-query attention is computed without
repeating K/V: the query heads that share a key/value head are folded into the query
axis ([n, kv_heads, group * q_len, head_dim]), and the causal mask is tiled to match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class PagedKV(Protocol):
    """What a model reads of the paged KV cache (ember.engine.kv_cache.KVCache)."""

    @property
    def block_size(self) -> int: ...

    @property
    def null_block(self) -> int:
        """A block kept zero: padded block-table entries read it."""
        ...

    @property
    def layers(self) -> Sequence[Tensor]:
        """Per layer [num_blocks + 1, block_size, 2, kv_heads, head_dim]: K and V side by side."""
        ...


@dataclass
class AttentionMetadata:
    """What the scheduler decided for one iteration, in batch order.

    block_tables rows are padded with -1 (not 0: a never-written block may hold
    NaN bit patterns, and a masked NaN key still poisons the softmax).
    """

    query_lens: list[int]  # per sequence: new tokens this iteration
    context_lens: list[int]  # per sequence: tokens already in the KV cache
    block_tables: Tensor  # [B, max_blocks_per_seq] int32
    slot_mapping: Tensor  # [T] int64: block_id * block_size + offset of each new token

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata from per-sequence block lists (each must cover context + new
        tokens); computes slot_mapping."""
        width = max(1, max((len(b) for b in block_tables), default=0))
        # one tensor from padded lists: a tensor per row costs more than the rows (~5 us each)
        padded = [[*blocks, *[-1] * (width - len(blocks))] for blocks in block_tables] or [[-1]]
        table = torch.tensor(padded, dtype=torch.int32)[: len(block_tables)]
        slots: list[int] = []
        for blocks, q, c in zip(block_tables, query_lens, context_lens, strict=True):
            slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(c, c + q))
        return cls(
            query_lens=list(query_lens),
            context_lens=list(context_lens),
            block_tables=table.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        )

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


@dataclass
class _Group:
    """Sequences of one query length, attended in one call."""

    seqs: int
    q_len: int
    token_index: Tensor | None  # [seqs * q_len] rows of the batch (None: every row, in order)
    block_table: Tensor | None  # [seqs, blocks] int64; None when nothing is cached: keys = new tokens
    # keys attended: the longest sequence's cached + new tokens (its last block's unwritten
    # tail is never read)
    key_len: int
    # (first block, key count) when the group is one sequence whose blocks are consecutive
    # ids (the usual case at batch 1): its keys are then a view of the cache, not a gather
    block_run: tuple[int, int] | None = None
    # window -> [seqs, 1, rows, keys] bool; none where every key is visible to every row: a
    # plain causal prefill (nothing cached, no window), or decodes of one context length
    # (LLM.generate's equal prompts) within the window
    masks: dict[int | None, Tensor] = field(default_factory=dict)


@dataclass
class AttentionPlan:
    """Everything derived from AttentionMetadata that every layer shares; built once
    per forward pass."""

    slot_mapping: Tensor
    num_tokens: int
    groups: list[_Group]
    # blocks whose first slot is written now: zeroed before the write, so the unwritten
    # tail of a sequence's last block (read, then masked) is never uninitialised memory
    fresh_blocks: Tensor | None

    @classmethod
    def build(
        cls,
        meta: AttentionMetadata,
        block_size: int,
        gqa_group: int,
        windows: Sequence[int | None],
        device: torch.device,
        null_block: int,
    ) -> AttentionPlan:
        """`null_block`: an always-zero cache block that padded table entries point to."""
        starts, total = [], 0
        for q in meta.query_lens:
            starts.append(total)
            total += q
        by_len: dict[int, list[int]] = {}
        for i, q in enumerate(meta.query_lens):
            by_len.setdefault(q, []).append(i)
        tables = meta.block_tables.to(device=device, dtype=torch.int64)
        tables = torch.where(tables < 0, null_block, tables)
        groups = []
        for q_len, seqs in by_len.items():
            whole = len(by_len) == 1
            index = None
            if not whole:
                rows = [starts[s] + j for s in seqs for j in range(q_len)]
                index = torch.tensor(rows, dtype=torch.int64, device=device)
            ctx = [meta.context_lens[s] for s in seqs]
            table = None
            key_len = max(ctx) + q_len
            if max(ctx) > 0:
                blocks = -(-key_len // block_size)
                sel = tables if whole else tables[torch.tensor(seqs, device=device)]
                table = sel[:, :blocks]
            group = _Group(len(seqs), q_len, index, table, key_len)
            if table is not None and len(seqs) == 1:
                group.block_run = _run(meta.block_tables[seqs[0], : table.shape[1]].tolist(), key_len)
            ctx_t = torch.tensor(ctx, dtype=torch.int64, device=device)
            # one new token after equal contexts sees every key (within the window)
            every_key = q_len == 1 and min(ctx) == max(ctx)
            for window in set(windows):
                if table is None and window is None:
                    continue  # plain causal: the fused kernel, no mask
                if every_key and (window is None or key_len <= window):
                    continue
                group.masks[window] = _mask(ctx_t, q_len, key_len, gqa_group, window)
            groups.append(group)
        slots = meta.slot_mapping.to(device)
        fresh = None
        if any(
            -(-(c + q) // block_size) > -(-c // block_size)
            for c, q in zip(meta.context_lens, meta.query_lens, strict=True)
        ):
            fresh = slots[slots % block_size == 0] // block_size
        return cls(slots, total, groups, fresh)


def _run(blocks: list[int], keys: int) -> tuple[int, int] | None:
    """(first block, keys) when `blocks` are consecutive ids, else None."""
    first = blocks[0]
    return (first, keys) if blocks == list(range(first, first + len(blocks))) else None


def _mask(ctx: Tensor, q_len: int, key_len: int, gqa_group: int, window: int | None) -> Tensor:
    """[seqs, 1, gqa_group * q_len, key_len] bool: key j is visible to new token i of a
    sequence with `ctx` cached tokens iff j <= ctx + i (and within the window)."""
    pos = ctx[:, None] + torch.arange(q_len, device=ctx.device)[None, :]  # [seqs, q_len]
    rows = pos.repeat(1, gqa_group)  # row g * q_len + i is query head g's token i
    keys = torch.arange(key_len, device=ctx.device)
    mask = keys[None, None, :] <= rows[:, :, None]
    if window is not None:
        mask &= keys[None, None, :] > rows[:, :, None] - window
    return mask[:, None]


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, cache: Tensor, plan: AttentionPlan, window: int | None = None
) -> Tensor:
    """q: [T, heads, d]; k, v: [T, kv_heads, d] (positions already applied); cache: one
    layer's [num_blocks, block_size, 2, kv_heads, d] (K and V). Writes k, v into the
    cache at plan.slot_mapping and returns the attention output [T, heads * d]."""
    tokens, heads, dim = q.shape
    if plan.fresh_blocks is not None:
        cache.index_fill_(0, plan.fresh_blocks, 0)
    cache.view(-1, *cache.shape[2:]).index_copy_(0, plan.slot_mapping, torch.stack((k, v), 1))
    if len(plan.groups) == 1:
        return _group_attention(q, k, v, cache, plan.groups[0], window)
    out = q.new_empty(tokens, heads * dim)
    for group in plan.groups:
        assert group.token_index is not None
        idx = group.token_index
        out.index_copy_(0, idx, _group_attention(q[idx], k[idx], v[idx], cache, group, window))
    return out


def _group_attention(
    q: Tensor, k: Tensor, v: Tensor, cache: Tensor, group: _Group, window: int | None
) -> Tensor:
    """One group: q [n * q_len, heads, d] -> [n * q_len, heads * d]."""
    n, q_len = group.seqs, group.q_len
    _, heads, dim = q.shape
    kv_heads = k.shape[1]
    g = heads // kv_heads
    mask = group.masks.get(window)
    if group.block_table is None and mask is None:
        # a prefill with nothing cached and no window: the fused causal kernel, no mask
        o = F.scaled_dot_product_attention(
            q.view(n, q_len, heads, dim).transpose(1, 2),
            k.view(n, q_len, kv_heads, dim).transpose(1, 2),
            v.view(n, q_len, kv_heads, dim).transpose(1, 2),
            is_causal=True,
            enable_gqa=g > 1,
        )
        return o.transpose(1, 2).reshape(n * q_len, heads * dim)
    # [n, kv_heads, g * q_len, d]; a view when q_len == 1
    if q_len == 1:
        qf = q.view(n, kv_heads, g, dim)
    else:
        qf = q.view(n, q_len, kv_heads, g, dim).permute(0, 2, 3, 1, 4).reshape(n, kv_heads, g * q_len, dim)
    if group.block_table is None:
        keys = k.view(n, q_len, kv_heads, dim).transpose(1, 2)
        values = v.view(n, q_len, kv_heads, dim).transpose(1, 2)
    else:
        blocks = group.block_table.shape[1]
        if group.block_run is not None:  # a view of the cache
            first = group.block_run[0]
            both = cache[first : first + blocks].view(1, -1, 2, kv_heads, dim)
        else:  # gathered as rows of whole blocks (2-D: one copy per block, not per element)
            rows = cache.view(cache.shape[0], -1).index_select(0, group.block_table.reshape(-1))
            both = rows.view(n, blocks * cache.shape[1], 2, kv_heads, dim)
        both = both[:, : group.key_len]  # [n, keys, 2, kv_heads, d]
        keys, values = both[:, :, 0].transpose(1, 2), both[:, :, 1].transpose(1, 2)
    o = F.scaled_dot_product_attention(qf, keys, values, attn_mask=mask)
    if q_len == 1:
        return o.reshape(n, heads * dim)
    return o.view(n, kv_heads, g, q_len, dim).permute(0, 3, 1, 2, 4).reshape(n * q_len, heads * dim)
