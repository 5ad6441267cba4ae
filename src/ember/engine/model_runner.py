"""ModelRunner: one iteration's batch -> model inputs -> hidden states -> sampled tokens."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ember.engine.attention import AttentionMetadata
from ember.engine.block_manager import BlockManager
from ember.engine.sampler import Sampler, SampleResult, SamplingRow
from ember.engine.scheduler import SchedulerOutput
from ember.engine.swapper import BlockMover


class ModelSpecLike(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def max_position_embeddings(self) -> int: ...


class KVCacheLike(BlockMover, Protocol):
    """The paged cache (ember.engine.kv_cache.KVCache): its size, and block copies for swapping."""

    @property
    def num_blocks(self) -> int: ...

    @property
    def block_size(self) -> int: ...


class CausalLMLike(Protocol):
    """The model side of ENGINE.md (ember.engine.model.CausalLM)."""

    @property
    def spec(self) -> ModelSpecLike: ...

    def forward(  # kv: the KVCache it was built with (Any: each model names its own cache type)
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: Any
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class ModelRunner:
    def __init__(
        self, model: CausalLMLike, kv_cache: KVCacheLike, blocks: BlockManager, device: torch.device
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = blocks
        self.device = device
        self.sampler = Sampler()

    def _inputs(self, batch: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        for s in batch.scheduled:
            ids += s.seq.tokens(s.start, s.start + s.num_new_tokens)
            positions += range(s.start, s.start + s.num_new_tokens)
        meta = AttentionMetadata.build(
            query_lens=[s.num_new_tokens for s in batch.scheduled],
            context_lens=[s.start for s in batch.scheduled],
            block_tables=[self.blocks.block_table(s.seq.request_id) for s in batch.scheduled],
            block_size=self.blocks.block_size,
            device=self.device,
        )
        dev = self.device
        return (
            torch.tensor(ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            meta,
        )

    def execute(self, batch: SchedulerOutput) -> list[SampleResult]:
        """Run the batch; one SampleResult per scheduled sequence that samples, in batch order."""
        input_ids, positions, meta = self._inputs(batch)
        rows, sample_index, end = [], [], 0
        for s in batch.scheduled:
            end += s.num_new_tokens
            if s.samples:
                assert s.seq.generator is not None
                rows.append(SamplingRow(s.seq.params, s.seq.output_token_ids, s.seq.generator))
                sample_index.append(end - 1)
        with torch.inference_mode():
            hidden = self.model.forward(input_ids, positions, meta, self.kv_cache)  # [T, hidden]
            if not rows:
                return []
            index = torch.tensor(sample_index, dtype=torch.int64, device=hidden.device)
            logits = self.model.compute_logits(hidden.index_select(0, index))  # [S, vocab]
            return self.sampler(logits, rows)
