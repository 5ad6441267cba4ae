"""PLACEHOLDER until the `model` branch lands: AttentionMetadata as ENGINE.md specifies it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    query_lens: list[int]
    context_lens: list[int]
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> AttentionMetadata:
        return cls(query_lens, context_lens, block_tables, slot_mapping)
