"""GittinsScheduler: rank jobs by their Gittins index under the learnt output lengths.

Among policies that do not know a job's size, the Gittins index policy minimises mean
completion time when the size distribution is known. A job that has generated `a`
tokens has index

    G(a) = max over quanta D of  P(S - a <= D | S > a) / E[min(S - a, D) | S > a]

(S: the output length): the best rate at which serving it for a while can finish it.
Jobs with the highest index run first. When a job that has run longer is more likely
to finish soon (a hazard that rises: light tails, similar lengths) its index rises with
service and the policy behaves like FCFS; when a long-running job is likely to run
much longer (a falling hazard: heavy tails) its index falls and the policy is least
attained service first, as MLFQ; a geometric length (constant hazard) gives every job
the same index and ties go to the earliest arrival: FCFS. The distribution is the
instance's OutputLengths, learnt from its own jobs, with the jobs still running
counted as censored.

Entry (FastServe's skip-join, in Gittins' terms): a job whose prompt is still to be
computed first needs a prefill whose time the PrefillProfile predicts. That time is
known service at the start of the job, so it enters every quantum's denominator:

    G(a, r) = max over D of  P(S - a <= D | S > a) / (r + E[min(S - a, D) | S > a])

with r the predicted prefill time beyond one decode iteration, in decode iterations
(the prefill also yields the first token). A short prompt keeps the new job's index,
so it overtakes long-running jobs as in MLFQ's top queue; a long one lowers it as
skipping to a lower queue does, the more the longer. Once prefilled (r = 0) the job
ranks by G(a) alone; a job sent back to recompute its cache ranks with that cost
again. A job that has not run for the starvation threshold (mlfq's setting) goes to
the front until it runs once more.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from ember.engine.block_manager import SwapKVAllocator
from ember.engine.mlfq import FALLBACK_QUANTUM_S
from ember.engine.output_lengths import OutputLengths
from ember.engine.prefill_profile import PrefillProfile
from ember.engine.priority_scheduler import PriorityScheduler
from ember.engine.scheduler import Clock, SchedulerOutput
from ember.engine.sequence import Sequence

STARVATION_ITERATIONS = 256  # decode iterations, as mlfq's default (twice its bottom quantum)
REFRESH_EVERY = 16  # iterations between recomputations of the index with the running jobs


class GittinsIndex:
    """Gittins indices of a length given per bin (edges e_0 = 1 < ... < e_B; bin k holds
    lengths [e_k, e_{k+1})) by P(pass bin k | reach it) and E[tokens generated in bin k
    | reach it]. The index of a job in bin k is computed at the bin's start (the job has
    generated e_k - 1 tokens) and kept for the whole bin; quanta end at bin edges.
    """

    def __init__(
        self, edges: Seq[int] | np.ndarray, stay: Seq[float] | np.ndarray, inside: Seq[float] | np.ndarray
    ) -> None:
        self.edges = np.asarray(edges, dtype=np.int64)
        stay_ = np.clip(np.asarray(stay, dtype=float), 0.0, 1.0)
        inside_ = np.asarray(inside, dtype=float)
        b = len(stay_)
        later = np.triu(np.ones((b, b), dtype=bool))  # [k, i]: i >= k; the rest is masked
        # [k, i]: P(reach e_{i+1} | reach e_k) and P(reach e_i | reach e_k), 0 where i < k
        past = np.where(later, np.cumprod(np.where(later, stay_[None, :], 1.0), axis=1), 0.0)
        reach = np.eye(b) + np.pad(past[:, :-1], ((0, 0), (1, 0)))
        # a quantum that ends at e_{j+1}, for a job at e_k: P(done by then), E[tokens run by then]
        self.done = np.where(later, 1.0 - past, 0.0)  # [B, B]
        self.done[:, -1] = 1.0  # nothing is longer than the cap
        self.tokens = np.where(later, np.cumsum(reach * inside_[None, :], axis=1), np.inf)  # [B, B]
        self.table = (self.done / np.maximum(self.tokens, 1e-300)).max(axis=1)  # [B], at each bin's start

    @classmethod
    def of(cls, lengths: OutputLengths, running: Seq[int] = ()) -> GittinsIndex:
        stay, inside = lengths.bins(running)
        return cls(lengths.edges, stay, inside)

    @classmethod
    def from_hazards(cls, edges: Seq[int] | np.ndarray, hazards: Seq[float] | np.ndarray) -> GittinsIndex:
        """A length whose per-token hazard P(token t is the last | t was generated) is
        constant within each bin (geometric inside it)."""
        h = np.clip(np.asarray(hazards, dtype=float), 0.0, 1.0)
        w = np.diff(np.asarray(edges, dtype=float))
        stay = np.power(1.0 - h, w)
        inside = np.where(h > 0, (1.0 - stay) / np.maximum(h, 1e-300), w)
        return cls(edges, stay, inside)

    def bin_of(self, generated: int) -> int:
        """The bin of the next length a job that generated `generated` tokens may have."""
        k = int(np.searchsorted(self.edges, generated + 1, side="right")) - 1
        return min(max(k, 0), len(self.table) - 1)

    def index(self, generated: int, extra: float = 0.0) -> float:
        """G(generated, extra) per token; `extra`: known service first, in tokens' time."""
        k = self.bin_of(generated)
        if extra <= 0:
            return float(self.table[k])
        return float((self.done[k] / (extra + self.tokens[k])).max())


@dataclass
class GittinsJob:
    ticket: int  # arrival order: breaks ties between equal indices
    last_run: float  # when it last ran (or arrived): the starvation clock
    promoted: int | None = None  # promotion order while at the front for starving
    entry: tuple[int, int, float] | None = None  # (tokens to compute, table version, index) cached


class GittinsScheduler(PriorityScheduler):
    """starvation_s None: STARVATION_ITERATIONS measured decode iterations."""

    def __init__(
        self,
        kv: SwapKVAllocator,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        lengths: OutputLengths | None = None,
        profile: PrefillProfile | None = None,
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
        self.lengths = lengths if lengths is not None else OutputLengths.prior()
        self.starvation_s = starvation_s
        self.state: dict[str, GittinsJob] = {}
        self._tickets = itertools.count()
        self.num_promotions = 0
        self._gittins: GittinsIndex | None = None
        self._table_version = 0  # bumped at every recomputation of the index
        self._seen_lengths = -1  # the lengths' version the index was computed from
        self._since_refresh = 0

    # -- the index ------------------------------------------------------------------

    @property
    def decode_s(self) -> float:
        return self.profile.decode_iteration_s or FALLBACK_QUANTUM_S

    @property
    def starvation_threshold(self) -> float:
        if self.starvation_s is not None:
            return self.starvation_s
        return STARVATION_ITERATIONS * self.decode_s

    @property
    def gittins(self) -> GittinsIndex:
        """The index under the current estimate: recomputed when a job left, and every
        REFRESH_EVERY iterations for the running jobs' censored lengths."""
        stale = self._seen_lengths != self.lengths.version or self._since_refresh >= REFRESH_EVERY
        if self._gittins is None or stale:
            running = [s.num_generated for s in self.jobs.values() if s.num_generated > 0]
            self._gittins = GittinsIndex.of(self.lengths, running)
            self._seen_lengths = self.lengths.version
            self._since_refresh = 0
            self._table_version += 1
        return self._gittins

    def prefill_extra(self, seq: Sequence) -> float:
        """The predicted prefill time of seq's tokens still to compute beyond one decode
        iteration, in decode iterations (0 for a job that decodes)."""
        todo = seq.num_tokens - seq.num_computed_tokens
        if todo <= 1 or not self.profile.ready:
            return 0.0
        d = self.decode_s
        seconds = self.profile.predict_iteration([todo], [seq.num_computed_tokens])
        return max(0.0, seconds - d) / d

    def index(self, seq: Sequence) -> float:
        """seq's Gittins index per decode iteration (higher runs first)."""
        g = self.gittins
        todo = seq.num_tokens - seq.num_computed_tokens
        if todo <= 1:
            return g.index(seq.num_generated)
        job = self.state[seq.request_id]
        if job.entry is None or job.entry[:2] != (todo, self._table_version):
            job.entry = (todo, self._table_version, g.index(seq.num_generated, self.prefill_extra(seq)))
        return job.entry[2]

    # -- PriorityScheduler hooks ----------------------------------------------------

    def on_add(self, seq: Sequence) -> None:
        self.state[seq.request_id] = GittinsJob(next(self._tickets), last_run=self.clock())

    def on_remove(self, seq: Sequence) -> None:
        self.state.pop(seq.request_id, None)

    def on_iteration(self, output: SchedulerOutput, elapsed_s: float, now: float) -> None:
        self._since_refresh += 1
        for s in output.scheduled:
            job = self.state.get(s.seq.request_id)
            if job is not None:
                job.last_run = now
                job.promoted = None

    def ranked(self, now: float) -> list[Sequence]:
        limit = self.starvation_threshold
        for job in self.state.values():
            if job.promoted is None and now - job.last_run >= limit:
                job.promoted = next(self._tickets)
                self.num_promotions += 1
        return sorted(self.jobs.values(), key=self._key)

    def _key(self, seq: Sequence) -> tuple[int, float, int]:
        job = self.state[seq.request_id]
        if job.promoted is not None:
            return (0, float(job.promoted), job.ticket)
        # indices equal to 1e-9 (a constant hazard, computed per bin) are a tie: arrival order
        return (1, -round(math.log(self.index(seq)), 9), job.ticket)
