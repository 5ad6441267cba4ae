"""CausalLM: the interface the engine runs, and what every model family shares."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ember.engine.attention import AttentionMetadata, AttentionPlan, PagedKV
from ember.engine.model.layers import linear
from ember.engine.model.spec import ModelSpec

if TYPE_CHECKING:
    from ember.store.loader import LoadProgress


class CausalLM(nn.Module):
    """A decoder-only language model over a paged KV cache.

    forward(input_ids, positions, meta, kv) -> hidden [T, hidden]: every scheduled
    sequence's new tokens concatenated in batch order; writes their K/V into `kv`.
    compute_logits(hidden [S, hidden]) -> [S, vocab] float32, only for the rows that
    sample. Run under torch.inference_mode().

    `loading`: while the weights are still arriving (a start that streams them from
    disk), the LoadProgress to wait on; forward waits for each layer's weights just
    before running it, so the first request computes behind the read. None once
    every weight is in (then `arrive` costs an attribute check).
    """

    spec: ModelSpec
    lm_head: nn.Parameter
    project_out: nn.Parameter | None
    loading: LoadProgress | None

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        super().__init__()
        self.spec = spec
        self.device = torch.device(device)
        self.project_out = None
        self.loading = None

    def arrive(self, *parts: nn.Module | Tensor | None) -> None:
        """Block until the weights of `parts` (modules or tensors) have arrived; raises
        the load's error (a corrupt chunk)."""
        loading = self.loading
        if loading is None:
            return
        if loading.complete:
            self.loading = None
            return
        tensors: list[Tensor] = []
        for part in parts:
            if isinstance(part, nn.Module):
                tensors.extend(part.parameters())
            elif part is not None:
                tensors.append(part)
        loading.wait_for(tensors)

    def plan(self, meta: AttentionMetadata, kv: PagedKV) -> AttentionPlan:
        """What all layers share about this iteration's attention."""
        return AttentionPlan.build(
            meta, kv.block_size, self.spec.gqa_group, self.spec.sliding_windows, self.device, kv.null_block
        )

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata, kv: PagedKV) -> Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [S, hidden] -> logits [S, vocab] float32."""
        if self.loading is not None:
            self.arrive(self.project_out, self.lm_head)
        if self.project_out is not None:
            hidden = linear(hidden, self.project_out)
        return linear(hidden, self.lm_head).float()
