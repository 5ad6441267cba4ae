"""PriorityScheduler: preemptive scheduling by a policy's order, with KV swapping.

Every iteration the policy ranks all unfinished jobs; the batch is filled from the top
down while it has sequence slots, token budget and KV room. A job that is not picked
keeps its KV cache where it is, so it resumes without recomputation. When a picked
job needs blocks that are not free, jobs ranked below it give theirs up, the lowest
first (their next run is the furthest away): swapped out to host memory when the
swap space has room. Only a job already running on the device that must grow may
send a victim to recomputation (when host memory is full); a job without a device
cache waits rather than make another job recompute.

Swap modes: "proactive" also keeps a reserve of free blocks for new arrivals by
swapping out the lowest-ranked jobs before an allocation fails, and swaps back in
the swapped jobs ranked to run next while blocks beyond the reserve are free, so
their copy overlaps the current iteration. "reactive" swaps only when an allocation
fails; "off" never swaps (vLLM's behaviour: recompute a victim only so that a
running job can grow).
"""

from __future__ import annotations

import abc
import math
import time

from ember.engine.block_manager import SwapKVAllocator
from ember.engine.prefill_profile import PrefillProfile
from ember.engine.scheduler import Clock, ScheduledSequence, Scheduler, SchedulerOutput
from ember.engine.sequence import Sequence, SequenceStatus


class PriorityScheduler(Scheduler):
    """The batch-filling and memory half shared by policies that rank jobs (MLFQ, SRPT)."""

    kv: SwapKVAllocator

    def __init__(
        self,
        kv: SwapKVAllocator,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        profile: PrefillProfile | None = None,
        swap: str = "proactive",
        reserve_fraction: float = 0.05,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(
            kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, clock=clock
        )
        self.profile = profile or PrefillProfile()  # iteration times: what a job's rank predicts
        self.swap = swap
        self.reserve_blocks = math.ceil(reserve_fraction * kv.num_blocks) if swap == "proactive" else 0
        self.jobs: dict[str, Sequence] = {}  # every unfinished job, in arrival order
        self._last_batch: set[str] = set()
        self._scheduled_at = 0.0

    # -- what a policy defines ------------------------------------------------------

    @abc.abstractmethod
    def ranked(self, now: float) -> list[Sequence]:
        """All jobs, the next to run first."""

    def on_add(self, seq: Sequence) -> None:
        """A job arrived."""

    def on_iteration(self, output: SchedulerOutput, elapsed_s: float, now: float) -> None:
        """An iteration of `elapsed_s` seconds ran the scheduled jobs."""

    def on_remove(self, seq: Sequence) -> None:
        """A job finished or was aborted."""

    # -- Scheduler ------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._last_batch)

    @property
    def num_waiting(self) -> int:
        return len(self.jobs) - len(self._last_batch)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.jobs[seq.request_id] = seq
        self.on_add(seq)

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.detach(request_id)
        if seq is not None:
            self.kv.free(request_id)
        return seq

    def detach(self, request_id: str) -> Sequence | None:
        seq = self.jobs.pop(request_id, None)
        if seq is None:
            return None
        self._last_batch.discard(request_id)
        self.on_remove(seq)
        return seq

    def schedule(self) -> SchedulerOutput:
        now = self._scheduled_at = self.clock()
        order = self.ranked(now)
        rank = {s.request_id: i for i, s in enumerate(order)}
        out = SchedulerOutput()
        chosen: set[str] = set()
        budget = self.max_num_batched_tokens
        for seq in order:
            if len(out.scheduled) >= self.max_num_seqs or budget <= 0:
                break
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            target = seq.num_computed_tokens + n
            if not self._make_room(seq, target, order, rank, chosen, out):
                continue
            if self.kv.is_swapped(seq.request_id):
                self.kv.swap_in(seq.request_id)
            self.kv.allocate(seq.request_id, target)
            out.scheduled.append(ScheduledSequence.of(seq, n))
            chosen.add(seq.request_id)
            budget -= n
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
        for seq in order:
            if seq.request_id not in chosen:
                seq.status = SequenceStatus.WAITING
                if seq.request_id in self._last_batch:  # stopped between two tokens
                    seq.metrics.num_preemptions += 1
                    self.num_preemptions += 1
        if self.swap == "proactive":
            self._keep_reserve(order, chosen, out)
            self._prefetch(order, chosen)
        self._last_batch = chosen
        return out

    def update(self, output: SchedulerOutput, finished: list[str]) -> None:
        now = self.clock()
        for s in output.scheduled:
            s.seq.num_computed_tokens = s.start + s.num_new_tokens
        self.on_iteration(output, now - self._scheduled_at, now)
        for seq_id in finished:
            seq = self.jobs.pop(seq_id, None)
            self.kv.free(seq_id)
            self._last_batch.discard(seq_id)
            if seq is not None:
                self.on_remove(seq)

    # -- memory ---------------------------------------------------------------------

    def _make_room(
        self,
        seq: Sequence,
        target: int,
        order: list[Sequence],
        rank: dict[str, int],
        chosen: set[str],
        out: SchedulerOutput,
    ) -> bool:
        """Free device blocks for `seq` to hold `target` tokens, taking them from the
        lowest-ranked jobs below it; False (and nothing evicted) if that cannot suffice.

        A job with no KV cache on the device (new, waiting to be recomputed, or coming
        back from host memory) may push others out only into host memory: dropping a
        cache to admit a job costs a recomputation, more than the newcomer gains by not
        waiting (vLLM never preempts for an admission either). A job running on the
        device that must grow by a block may also send victims to recomputation when
        host memory is full, or the batch could deadlock."""
        seq_id = seq.request_id
        need = self.kv.blocks_needed(seq_id, target) - self.kv.num_free_blocks
        if need <= 0:
            return True
        held_here = self.kv.num_device_blocks(seq_id)
        kv = self.kv
        in_use = kv.num_blocks - kv.num_free_blocks - held_here
        if need > in_use - sum(kv.num_device_blocks(c) for c in chosen):
            return False  # even every unchosen job's blocks would not do: skip the scan below
        admitting = held_here == 0
        host = self.kv.host_free_blocks if self.swap != "off" else 0
        victims: list[Sequence] = []
        freed = 0
        for victim in reversed(order[rank[seq_id] + 1 :]):
            if freed >= need:
                break
            held = self.kv.num_device_blocks(victim.request_id)
            if victim.request_id in chosen or held == 0:
                continue
            if held <= host:
                host -= held
            elif admitting:
                continue
            victims.append(victim)
            freed += held
        if freed < need:
            return False
        for victim in victims:
            self._evict(victim, out, allow_recompute=not admitting)
        return True

    def _evict(self, victim: Sequence, out: SchedulerOutput, *, allow_recompute: bool) -> bool:
        """Take the victim's device blocks: swap them out, or drop them to recompute."""
        seq_id = victim.request_id
        if self.swap != "off" and self.kv.can_swap_out(seq_id):
            self.kv.swap_out(seq_id)
            out.swapped_out.append(seq_id)
            return True
        if not allow_recompute:
            return False
        self.kv.free(seq_id)
        victim.num_computed_tokens = 0
        self.num_recomputations += 1
        out.preempted.append(seq_id)
        return True

    def _keep_reserve(self, order: list[Sequence], chosen: set[str], out: SchedulerOutput) -> None:
        """Swap out the last-to-run jobs until the reserve of free blocks is back."""
        for victim in reversed(order):
            if self.kv.num_free_blocks >= self.reserve_blocks:
                return
            if victim.request_id not in chosen and self.kv.num_device_blocks(victim.request_id) > 0:
                self._evict(victim, out, allow_recompute=False)

    def _prefetch(self, order: list[Sequence], chosen: set[str]) -> None:
        """Swap in, in rank order, the swapped jobs likely to be in the next batches,
        while that leaves the reserve free; their copies run beside this iteration."""
        horizon = order[: 2 * self.max_num_seqs]
        for seq in horizon:
            if seq.request_id in chosen or not self.kv.is_swapped(seq.request_id):
                continue
            need = self.kv.blocks_needed(seq.request_id, seq.num_computed_tokens + 1)
            room = self.kv.num_free_blocks - need >= self.reserve_blocks
            if not room or not self.kv.can_swap_in(seq.request_id):
                return
            self.kv.swap_in(seq.request_id)
