"""Sequence: the engine's mutable state of one running request."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember.engine.request import FinishReason, RequestMetrics, SamplingParams

if TYPE_CHECKING:
    import torch

    from ember.engine.detokenizer import IncrementalDetokenizer


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request inside the engine.

    `num_computed_tokens` counts the tokens whose K/V is in the cache; the scheduler
    advances it, and resets it to 0 when it preempts the sequence (recomputation).
    A sequence samples in an iteration when that iteration computes its last token,
    unless it is `park`ed: then it only fills the cache, and the engine parks it.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    output_token_ids: list[int] = field(default_factory=list)
    prompt: str | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    park: bool = False  # compute the cache of its tokens, sample nothing (live migration)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None  # the sampler's random state (CPU)
    detokenizer: IncrementalDetokenizer | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_generated(self) -> int:
        """Outputs counted against max_tokens, including ones handed over by a resume."""
        return len(self.output_token_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + outputs."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
