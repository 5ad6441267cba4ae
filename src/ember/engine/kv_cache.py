"""KVCache: the paged key/value cache, per layer [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ember.engine.model.spec import ModelSpec


def num_blocks_for_budget(spec: ModelSpec, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    """How many blocks of `block_size` tokens fit in `budget_bytes` of cache."""
    return max(0, budget_bytes // (spec.kv_bytes_per_token(dtype) * block_size))


class KVCache:
    """Keys and values of every layer in fixed-size blocks. A block id means the same
    slots in every layer, so one block table serves the whole model."""

    def __init__(
        self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        # Per layer one tensor [num_blocks + 1, block_size, 2, kv_heads, head_dim] holding
        # K and V side by side, so attention writes and gathers both with one op each;
        # keys[i] / values[i] are views of it, [num_blocks + 1, block_size, kv_heads, head_dim].
        # One extra block, `null_block`, kept zero: padded block-table entries read it.
        # torch.empty: other pages are touched only when blocks are first written
        # (attention zeroes a block as its first slot is written).
        shape = (num_blocks + 1, block_size, 2, spec.num_kv_heads, spec.head_dim)
        self.layers = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(spec.num_layers)]
        for t in self.layers:
            t[num_blocks].zero_()
        self.keys = [t[:, :, 0] for t in self.layers]
        self.values = [t[:, :, 1] for t in self.layers]

    @property
    def null_block(self) -> int:
        """The id of the always-zero block (not one of the num_blocks for sequences)."""
        return self.num_blocks

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, K and V."""
        return self.block_size * self.spec.kv_bytes_per_token(self.dtype)

    def copy_blocks_out(self, block_ids: Sequence[int], *, pin: bool = False) -> list[Tensor]:
        """The blocks' contents as host tensors, one per layer:
        [len(block_ids), block_size, 2, kv_heads, head_dim] (K and V)."""
        idx = torch.tensor(list(block_ids), dtype=torch.int64, device=self.device)
        out = []
        for layer in self.layers:
            host = torch.empty((len(block_ids), *layer.shape[1:]), dtype=self.dtype, pin_memory=pin)
            host.copy_(layer.index_select(0, idx))
            out.append(host)
        return out

    def copy_blocks_in(self, block_ids: Sequence[int], data: Sequence[Tensor]) -> None:
        """Write what copy_blocks_out returned into blocks `block_ids` (may differ from
        the ids it was copied out of)."""
        idx = torch.tensor(list(block_ids), dtype=torch.int64, device=self.device)
        for layer, host in zip(self.layers, data, strict=True):
            layer.index_copy_(0, idx, host.to(self.device, non_blocking=True))
