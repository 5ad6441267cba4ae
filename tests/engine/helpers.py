"""Test-only driving of a CausalLM over a paged KV cache: a block pool, a step that
runs any mix of prefill / chunked prefill / decode, and a greedy loop. The real
engine (scheduler, block manager, sampler) lives elsewhere; this is the smallest
thing that feeds the model the way the engine does."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ember.engine.attention import AttentionMetadata
from ember.engine.kv_cache import KVCache
from ember.engine.model import CausalLM


class BlockPool:
    """Hands out block ids in a shuffled order, so a sequence's blocks are never
    contiguous and paging bugs show."""

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)

    def take(self) -> int:
        return self.free.pop()


@dataclass
class Seq:
    tokens: list[int]  # prompt + generated so far
    computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)


def run_step(
    model: CausalLM, kv: KVCache, pool: BlockPool, seqs: list[Seq], counts: list[int]
) -> tuple[Tensor, list[int]]:
    """Run `counts[i]` new tokens of every sequence with counts[i] > 0 in one batch.
    Returns the hidden states [T, hidden] and, per scheduled sequence, the row of its
    last new token."""
    ids: list[int] = []
    pos: list[int] = []
    q_lens, ctx_lens, tables, last_rows = [], [], [], []
    for seq, n in zip(seqs, counts, strict=True):
        if n == 0:
            continue
        while len(seq.blocks) * kv.block_size < seq.computed + n:
            seq.blocks.append(pool.take())
        ids += seq.tokens[seq.computed : seq.computed + n]
        pos += range(seq.computed, seq.computed + n)
        q_lens.append(n)
        ctx_lens.append(seq.computed)
        tables.append(seq.blocks)
        last_rows.append(len(ids) - 1)
    meta = AttentionMetadata.build(q_lens, ctx_lens, tables, kv.block_size, kv.device)
    dev = kv.device
    hidden = model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta, kv)
    for seq, n in zip(seqs, counts, strict=True):
        seq.computed += n
    return hidden, last_rows


def all_logits(
    model: CausalLM, kv: KVCache, sequences: list[list[int]], schedule: list[list[int]], seed: int = 0
) -> list[Tensor]:
    """Feed `sequences` through the cache in the steps `schedule` gives (step s runs
    schedule[s][i] tokens of sequence i) and return every position's logits per
    sequence ([len, vocab])."""
    pool = BlockPool(kv.num_blocks, seed)
    seqs = [Seq(list(s)) for s in sequences]
    out: list[list[Tensor]] = [[] for _ in seqs]
    with torch.inference_mode():
        for counts in schedule:
            hidden, _ = run_step(model, kv, pool, seqs, counts)
            logits = model.compute_logits(hidden)
            row = 0
            for i, n in enumerate(counts):
                out[i].append(logits[row : row + n])
                row += n
    assert all(s.computed == len(s.tokens) for s in seqs), "schedule does not cover the sequences"
    return [torch.cat(o) for o in out]


def greedy(
    model: CausalLM,
    kv: KVCache,
    prompts: list[list[int]],
    max_new_tokens: int,
    chunk: int | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Greedy decoding of all prompts batched together; prompts are prefilled in
    chunks of `chunk` tokens (None: whole), so long prompts are still prefilling while
    short ones decode. Returns the generated tokens per prompt (no stop tokens)."""
    pool = BlockPool(kv.num_blocks, seed)
    seqs = [Seq(list(p)) for p in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        while any(len(g) < max_new_tokens for g in generated):
            counts = []
            for seq, g in zip(seqs, generated, strict=True):
                todo = len(seq.tokens) - seq.computed if len(g) < max_new_tokens else 0
                counts.append(min(todo, chunk) if chunk and todo > 1 else todo)
            hidden, last_rows = run_step(model, kv, pool, seqs, counts)
            # only the rows that sample get logits: the last token of a finished prefill or a decode
            sampling = [
                (i, r)
                for (i, n), r in zip(((i, n) for i, n in enumerate(counts) if n), last_rows, strict=True)
                if seqs[i].computed == len(seqs[i].tokens)
            ]
            if not sampling:
                continue
            rows = torch.tensor([r for _, r in sampling], device=hidden.device)
            next_ids = model.compute_logits(hidden[rows]).argmax(-1).tolist()
            for (i, _), tok in zip(sampling, next_ids, strict=True):
                seqs[i].tokens.append(tok)
                generated[i].append(tok)
    return generated
