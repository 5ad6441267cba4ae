"""Scheduling policies by name: the one place a policy is chosen from its name.

`POLICIES` maps each name to how the policy is built. The names themselves
(`PolicyName`, `POLICY_NAMES`) live in engine/options.py, which imports neither torch
nor numpy, so `ember serve --scheduler` is checked before anything heavy loads; a new
policy is a Scheduler subclass registered here and its name added there (a test
checks the two agree).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard

from ember.engine.block_manager import SwapKVAllocator
from ember.engine.gittins import GittinsScheduler
from ember.engine.mlfq import SkipJoinMLFQ
from ember.engine.options import SCHEDULERS, SchedulerName
from ember.engine.output_lengths import OutputLengths
from ember.engine.prefill_profile import PrefillProfile
from ember.engine.scheduler import Clock, FCFSScheduler, Scheduler
from ember.engine.srpt import SRPTScheduler
from ember.errors import InvalidRequestError

PolicyName = SchedulerName
POLICY_NAMES: tuple[PolicyName, ...] = SCHEDULERS


@dataclass(frozen=True)
class PolicyOptions:
    """What a policy is built with. Every policy takes the batch limits and the clock;
    the rest are read only by the policies named beside them."""

    max_num_seqs: int
    max_num_batched_tokens: int
    clock: Clock = time.monotonic
    profile: PrefillProfile | None = None  # mlfq, srpt, gittins: predicted iteration times
    swap: str = "proactive"  # mlfq, srpt, gittins: proactive, reactive or off
    reserve_fraction: float = 0.05  # mlfq, srpt, gittins: device blocks kept free (proactive)
    base_quantum_s: float | None = None  # mlfq
    num_queues: int = 8  # mlfq
    starvation_s: float | None = None  # mlfq, gittins
    lengths: OutputLengths | None = None  # gittins: the learnt output lengths (None: the prior)


@dataclass(frozen=True)
class Policy:
    build: Callable[[SwapKVAllocator, PolicyOptions], Scheduler]
    swaps: bool  # moves a preempted job's KV cache to host memory; else drops it to recompute


def _fcfs(kv: SwapKVAllocator, o: PolicyOptions) -> Scheduler:
    return FCFSScheduler(
        kv, max_num_seqs=o.max_num_seqs, max_num_batched_tokens=o.max_num_batched_tokens, clock=o.clock
    )


def _mlfq(kv: SwapKVAllocator, o: PolicyOptions) -> Scheduler:
    return SkipJoinMLFQ(
        kv, max_num_seqs=o.max_num_seqs, max_num_batched_tokens=o.max_num_batched_tokens, clock=o.clock,
        profile=o.profile, swap=o.swap, reserve_fraction=o.reserve_fraction,
        base_quantum_s=o.base_quantum_s, num_queues=o.num_queues, starvation_s=o.starvation_s,
    )  # fmt: skip


def _srpt(kv: SwapKVAllocator, o: PolicyOptions) -> Scheduler:
    return SRPTScheduler(
        kv, max_num_seqs=o.max_num_seqs, max_num_batched_tokens=o.max_num_batched_tokens, clock=o.clock,
        profile=o.profile, swap=o.swap, reserve_fraction=o.reserve_fraction,
    )  # fmt: skip


def _gittins(kv: SwapKVAllocator, o: PolicyOptions) -> Scheduler:
    return GittinsScheduler(
        kv, max_num_seqs=o.max_num_seqs, max_num_batched_tokens=o.max_num_batched_tokens, clock=o.clock,
        lengths=o.lengths, profile=o.profile, starvation_s=o.starvation_s, swap=o.swap,
        reserve_fraction=o.reserve_fraction,
    )  # fmt: skip


POLICIES: dict[PolicyName, Policy] = {
    "mlfq": Policy(_mlfq, swaps=True),  # FastServe's skip-join MLFQ
    "fcfs": Policy(_fcfs, swaps=False),  # vLLM's continuous batching
    "srpt": Policy(_srpt, swaps=True),  # an oracle: reads each job's max_tokens
    "gittins": Policy(_gittins, swaps=True),  # learns output lengths; never reads max_tokens
}


def is_policy_name(name: str) -> TypeGuard[PolicyName]:
    """Whether a policy is called `name` (for mypy: `name` is a PolicyName)."""
    return name in POLICIES


def policy(name: str) -> Policy:
    """The policy called `name`; InvalidRequestError (param `scheduler`) naming the
    known ones if there is none."""
    if not is_policy_name(name):
        raise InvalidRequestError(
            f"unknown scheduler {name!r}; known: {', '.join(POLICY_NAMES)}", param="scheduler"
        )
    return POLICIES[name]
