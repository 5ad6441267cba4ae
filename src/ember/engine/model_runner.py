"""ModelRunner: one iteration's batch -> model inputs -> hidden states -> sampled tokens."""

from __future__ import annotations

from typing import Protocol

import torch

from ember.engine.attention import AttentionMetadata
from ember.engine.block_manager import BlockManager
from ember.engine.sampler import Sampler, SampleResult, SamplingRow
from ember.engine.scheduler import SchedulerOutput


class ModelSpecLike(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def max_position_embeddings(self) -> int: ...


class KVCacheLike(Protocol):
    @property
    def num_blocks(self) -> int: ...

    @property
    def block_size(self) -> int: ...


class CausalLMLike(Protocol):
    """The model side of ENGINE.md (ember.engine.model.CausalLM)."""

    @property
    def spec(self) -> ModelSpecLike: ...

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv: KVCacheLike
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
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        for s in batch.scheduled:
            seq, start, end = s.seq, s.start, s.start + s.num_new_tokens
            ids += seq.tokens(start, end)
            positions += range(start, end)
            slots += self.blocks.slots(seq.request_id, start, end)
            query_lens.append(s.num_new_tokens)
            context_lens.append(start)
            tables.append(self.blocks.block_table(seq.request_id))
        width = max(len(t) for t in tables)
        # block tables are padded with 0; entries past a sequence's length are never read
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata.build(
            query_lens=query_lens,
            context_lens=context_lens,
            block_tables=table.to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        )
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
