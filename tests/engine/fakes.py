"""A fake model that honours the engine contract without transformers.

Its next token is a hash of every token in the context, read back from its paged KV
cache through the block tables and slot mapping the engine builds, so any mistake in
paging, chunking, preemption or resume changes the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ember.engine.attention import AttentionMetadata

PRIME = 1_000_003


@dataclass(frozen=True)
class FakeSpec:
    vocab_size: int = 97
    max_position_embeddings: int = 4096


def context_hash(tokens: Sequence[int], vocab_size: int) -> int:
    h = 17
    for pos, t in enumerate(tokens):
        h = (h * 31 + (t + 1) * (pos + 3)) % PRIME
    return h % vocab_size


class FakeKVCache:
    """One token id per slot; copies blocks out and in like KVCache, so a swap that
    loses or misplaces a block changes what the fake model reads back."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.block_bytes = 8 * block_size  # what the swap budget counts: 8 bytes a token
        self.device = torch.device("cpu")
        self.tokens = torch.full((num_blocks * block_size,), -1, dtype=torch.int64)

    def _slots(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
        return (ids.unsqueeze(1) * self.block_size + torch.arange(self.block_size)).reshape(-1)

    def copy_blocks_out(self, block_ids: Sequence[int], *, pin: bool = False) -> torch.Tensor:
        slots = self._slots(block_ids)
        data = self.tokens[slots].clone()
        self.tokens[slots] = -1  # a freed block must not still hold the right tokens by luck
        return data

    def copy_blocks_in(self, block_ids: Sequence[int], data: torch.Tensor) -> None:
        self.tokens[self._slots(block_ids)] = data


class FakeModel:
    """hidden [T, 1] = hash of the context up to each token; logits peak at that hash."""

    def __init__(self, spec: FakeSpec | None = None, spread: float = 0.4) -> None:
        self.spec = spec or FakeSpec()
        self.spread = spread
        self.calls: list[list[int]] = []  # query_lens per forward

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: FakeKVCache
    ) -> torch.Tensor:
        assert input_ids.shape == positions.shape == meta.slot_mapping.shape
        kv.tokens[meta.slot_mapping] = input_ids
        self.calls.append(list(meta.query_lens))
        out, row, bs = [], 0, kv.block_size
        for i, (q, c) in enumerate(zip(meta.query_lens, meta.context_lens, strict=True)):
            table = meta.block_tables[i].tolist()
            for j in range(q):
                assert int(positions[row + j]) == c + j
                ctx = [int(kv.tokens[table[p // bs] * bs + p % bs]) for p in range(c + j + 1)]
                assert -1 not in ctx, "context read from a slot never written"
                out.append(float(context_hash(ctx, self.spec.vocab_size)))
            row += q
        return torch.tensor(out, dtype=torch.float64).reshape(-1, 1)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        v = self.spec.vocab_size
        centre = hidden.round().long()  # [S, 1]
        distance = (torch.arange(v).unsqueeze(0) - centre) % v  # [S, V]
        return (-self.spread * distance).float()


def reference_greedy(prompt: Sequence[int], max_tokens: int, vocab_size: int = 97) -> list[int]:
    tokens, out = list(prompt), []
    for _ in range(max_tokens):
        t = context_hash(tokens, vocab_size)
        tokens.append(t)
        out.append(t)
    return out
