"""SkipJoinMLFQ: FastServe's skip-join multi-level feedback queue.

Queues Q0..Q(n-1) have quanta q, 2q, 4q, ... A new job joins the highest queue whose
quantum covers its predicted first iteration (the prefill, predicted by the instance's
PrefillProfile from the input length), skipping the queues above, where it would be
demoted at once. Every iteration the jobs in the batch consume their quantum by the
iteration's measured time; a job that used up its quantum drops to the back of the next
queue. A job that has not run for `starvation_s` goes back to the top queue. Within a
queue jobs run in the order they entered it. The batch is filled from Q0 downwards
(PriorityScheduler), so short jobs overtake long ones without knowing output lengths.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from ember.engine.block_manager import SwapKVAllocator
from ember.engine.prefill_profile import PrefillProfile
from ember.engine.priority_scheduler import PriorityScheduler
from ember.engine.scheduler import Clock, SchedulerOutput
from ember.engine.sequence import Sequence

FALLBACK_QUANTUM_S = 0.02  # the base quantum until the first decode iteration is measured


@dataclass
class MLFQJob:
    level: int  # 0 is the top queue
    ticket: int  # order within the queue: lower entered first
    used_s: float = 0.0  # of the current queue's quantum
    last_run: float = 0.0  # when it last ran (or arrived): the starvation clock


class SkipJoinMLFQ(PriorityScheduler):
    """base_quantum_s None: the profile's measured decode iteration time (one token per
    quantum at the top). starvation_s None: twice the bottom queue's quantum."""

    def __init__(
        self,
        kv: SwapKVAllocator,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        profile: PrefillProfile | None = None,
        base_quantum_s: float | None = None,
        num_queues: int = 8,
        starvation_s: float | None = None,
        swap: str = "proactive",
        reserve_fraction: float = 0.05,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(
            kv,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            profile=profile,
            swap=swap,
            reserve_fraction=reserve_fraction,
            clock=clock,
        )
        self.base_quantum_s = base_quantum_s
        self.num_queues = num_queues
        self.starvation_s = starvation_s
        self.state: dict[str, MLFQJob] = {}
        self._tickets = itertools.count()
        self.num_promotions = 0

    # -- the queues -----------------------------------------------------------------

    @property
    def base_quantum(self) -> float:
        if self.base_quantum_s is not None:
            return self.base_quantum_s
        return self.profile.decode_iteration_s or FALLBACK_QUANTUM_S

    def quantum(self, level: int) -> float:
        return self.base_quantum * float(2**level)

    @property
    def starvation_threshold(self) -> float:
        if self.starvation_s is not None:
            return self.starvation_s
        return 2 * self.quantum(self.num_queues - 1)

    def join_level(self, predicted_s: float) -> int:
        """The highest queue whose quantum covers a first iteration of predicted_s."""
        for level in range(self.num_queues):
            if self.quantum(level) >= predicted_s:
                return level
        return self.num_queues - 1

    def queues(self) -> list[list[str]]:
        """Job ids per queue, top first, each in run order (for inspection and tests)."""
        out: list[list[str]] = [[] for _ in range(self.num_queues)]
        for seq in self.ranked(self.clock(), promote=False):
            out[self.state[seq.request_id].level].append(seq.request_id)
        return out

    # -- PriorityScheduler hooks ----------------------------------------------------

    def on_add(self, seq: Sequence) -> None:
        # a resumed job also recomputes its handed-over outputs in the first iteration
        first = min(seq.num_tokens - seq.num_computed_tokens, self.max_num_batched_tokens)
        level = self.join_level(self.profile.predict_prefill(first))
        self.state[seq.request_id] = MLFQJob(level, next(self._tickets), last_run=self.clock())

    def on_remove(self, seq: Sequence) -> None:
        self.state.pop(seq.request_id, None)

    def ranked(self, now: float, promote: bool = True) -> list[Sequence]:
        if promote:
            limit = self.starvation_threshold
            for job in self.state.values():
                if now - job.last_run >= limit and job.level > 0:
                    job.level, job.used_s, job.ticket = 0, 0.0, next(self._tickets)
                    job.last_run = now  # its wait restarts from the top queue
                    self.num_promotions += 1
        state = self.state
        return sorted(
            self.jobs.values(), key=lambda s: (state[s.request_id].level, state[s.request_id].ticket)
        )

    def on_iteration(self, output: SchedulerOutput, elapsed_s: float, now: float) -> None:
        for s in output.scheduled:
            job = self.state.get(s.seq.request_id)
            if job is None:
                continue
            job.used_s += elapsed_s
            job.last_run = now
            if job.used_s >= self.quantum(job.level) and job.level < self.num_queues - 1:
                job.level += 1
                job.used_s = 0.0
                job.ticket = next(self._tickets)
