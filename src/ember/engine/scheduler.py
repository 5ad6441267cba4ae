"""Scheduling policies: which sequences run in the next iteration, and how many tokens each.
The `Scheduler` interface and FCFS; the policies by name: ember.engine.policies.

A policy is a plain object over Sequences and a KVAllocator; it never sees the model
or block internals, so it is tested with fake requests and a fake cache. Every
iteration is scheduled afresh, so any sequence can be stopped between two tokens.
"""

from __future__ import annotations

import abc
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ember.engine.block_manager import KVAllocator
from ember.engine.sequence import Sequence, SequenceStatus

Clock = Callable[[], float]


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    start: int  # the sequence's num_computed_tokens when scheduled
    num_new_tokens: int  # tokens computed this iteration: positions [start, start + num_new_tokens)
    samples: bool  # this iteration computes the sequence's last token, so it samples the next

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        return cls(seq, start, num_new_tokens, start + num_new_tokens == seq.num_tokens and not seq.park)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # ids sent back to recompute this iteration
    swapped_out: list[str] = field(default_factory=list)  # ids whose KV blocks went to host memory

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler(abc.ABC):
    """The interface the engine drives: add, abort, schedule, update."""

    def __init__(
        self,
        kv: KVAllocator,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        clock: Clock = time.monotonic,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.clock = clock
        self.num_preemptions = 0  # times a job was stopped before it finished
        self.num_recomputations = 0  # times a job's KV cache was dropped, to be recomputed

    @abc.abstractmethod
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> Sequence | None:
        """Drop a sequence wherever it is, free its KV blocks; None if unknown."""

    @abc.abstractmethod
    def detach(self, request_id: str) -> Sequence | None:
        """Drop a sequence like abort() but keep its KV blocks: the engine parked it and
        owns them until a later request takes them over or frees them."""

    @abc.abstractmethod
    def schedule(self) -> SchedulerOutput:
        """Pick this iteration's batch and reserve KV room for it."""

    @abc.abstractmethod
    def update(self, output: SchedulerOutput, finished: list[str]) -> None:
        """After the step: advance computed tokens, drop and free finished sequences."""

    @property
    @abc.abstractmethod
    def num_running(self) -> int: ...

    @property
    @abc.abstractmethod
    def num_waiting(self) -> int: ...

    def has_unfinished(self) -> bool:
        return self.num_running + self.num_waiting > 0


class FCFSScheduler(Scheduler):
    """First come, first served with continuous batching (what vLLM does).

    Each iteration: running sequences in arrival order each get min(remaining, budget)
    tokens (1 for decode, a chunk for a long prefill), then waiting sequences join
    while there is room. When KV blocks run out, the most recently arrived running
    sequence is preempted: its blocks are freed and it goes back to the front of the
    waiting queue, to recompute prompt + generated tokens later.
    """

    def __init__(
        self,
        kv: KVAllocator,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(
            kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, clock=clock
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.detach(request_id)
        if seq is not None:
            self.kv.free(request_id)
        return seq

    def detach(self, request_id: str) -> Sequence | None:
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    return seq
        return None

    def _preempt(self, victim: Sequence, out: SchedulerOutput) -> None:
        self.kv.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.status = SequenceStatus.WAITING
        victim.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.num_recomputations += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim.request_id)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.can_allocate(seq.request_id, seq.num_computed_tokens + n):
                # the latest arrival goes; those before i are already scheduled this iteration
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                self.kv.allocate(seq.request_id, seq.num_computed_tokens + n)
                out.scheduled.append(ScheduledSequence.of(seq, n))
                budget -= n
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        now = self.clock()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.can_allocate(seq.request_id, seq.num_computed_tokens + n):
                break  # first come first served: nobody overtakes the head of the queue
            self.kv.allocate(seq.request_id, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = now
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence.of(seq, n))
            budget -= n

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:  # after a preemption memory is tight: let the running finish first
            self._schedule_waiting(out, budget)
        return out

    def update(self, output: SchedulerOutput, finished: list[str]) -> None:
        for s in output.scheduled:
            s.seq.num_computed_tokens = s.start + s.num_new_tokens
        if finished:
            done = set(finished)
            self.running = [s for s in self.running if s.request_id not in done]
            for seq_id in done:
                self.kv.free(seq_id)
