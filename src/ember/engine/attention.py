"""PLACEHOLDER until the `model` branch lands: AttentionMetadata as ENGINE.md specifies it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class AttentionMetadata:
    query_lens: list[int]
    context_lens: list[int]
    block_tables: Tensor  # [B, max_blocks_per_seq] int32, padded with -1
    slot_mapping: Tensor  # [T] int64

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        context_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        width = max((len(b) for b in block_tables), default=0)
        table = torch.full((len(block_tables), max(width, 1)), -1, dtype=torch.int32)
        slots: list[int] = []
        for i, (blocks, q, c) in enumerate(zip(block_tables, query_lens, context_lens, strict=True)):
            table[i, : len(blocks)] = torch.tensor(list(blocks), dtype=torch.int32)
            slots.extend(blocks[p // block_size] * block_size + p % block_size for p in range(c, c + q))
        return cls(
            list(query_lens),
            list(context_lens),
            table.to(device),
            torch.tensor(slots, dtype=torch.int64, device=device),
        )
