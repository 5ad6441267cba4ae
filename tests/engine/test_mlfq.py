"""Skip-join MLFQ queue logic and memory policy with fake sequences, a fake cache and an
injectable clock: no model."""

from __future__ import annotations

from ember.engine.block_manager import BlockManager
from ember.engine.mlfq import SkipJoinMLFQ
from ember.engine.prefill_profile import PrefillProfile
from ember.engine.request import RequestMetrics, SamplingParams
from ember.engine.scheduler import SchedulerOutput
from ember.engine.sequence import Sequence
from ember.engine.swapper import KVSwapper
from tests.engine.fakes import FakeKVCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def seq(rid: str, prompt_len: int, max_tokens: int = 100) -> Sequence:
    return Sequence(
        rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), RequestMetrics(0)
    )


def linear_profile(seconds_per_token: float) -> PrefillProfile:
    """A profile that has seen prefills costing exactly seconds_per_token each."""
    profile = PrefillProfile()
    for n in (10, 100, 400, 1000):
        profile.observe([n], [0], n * seconds_per_token)
    return profile


def make(
    *,
    num_blocks: int = 64,
    host_blocks: int = 64,
    seqs: int = 8,
    tokens: int = 64,
    swap: str = "proactive",
    reserve: float = 0.0,
    **options: object,
) -> tuple[SkipJoinMLFQ, KVSwapper, Clock]:
    clock = Clock()
    kv = KVSwapper(BlockManager(num_blocks, 4), FakeKVCache(num_blocks, 4), host_blocks, background=False)
    options.setdefault("base_quantum_s", 1.0)
    s = SkipJoinMLFQ(
        kv,
        max_num_seqs=seqs,
        max_num_batched_tokens=tokens,
        swap=swap,
        reserve_fraction=reserve,
        clock=clock,
        **options,  # type: ignore[arg-type]
    )
    return s, kv, clock


def iterate(
    s: SkipJoinMLFQ, clock: Clock, seconds: float = 1.0, finish: frozenset[str] = frozenset()
) -> SchedulerOutput:
    """One iteration of `seconds` on the clock: schedule, sample, update."""
    out = s.schedule()
    clock.now += seconds
    done = []
    for item in out.scheduled:
        if item.samples:
            item.seq.output_token_ids.append(0)
            if item.seq.request_id in finish:
                done.append(item.seq.request_id)
    s.update(out, done)
    return out


def ran(out: SchedulerOutput) -> list[str]:
    return [x.seq.request_id for x in out.scheduled]


def test_new_jobs_skip_the_queues_whose_quantum_their_prefill_would_overrun() -> None:
    s, _, _ = make(profile=linear_profile(0.001), base_quantum_s=0.01, num_queues=6, tokens=4096)
    for rid, n in [("tiny", 5), ("mid", 30), ("long", 100), ("huge", 2000)]:
        s.add(seq(rid, n))
    # predicted prefills 0.005, 0.03, 0.1, 2.0 s; quanta 0.01, 0.02, 0.04, 0.08, 0.16, 0.32
    assert s.queues() == [["tiny"], [], ["mid"], [], ["long"], ["huge"]]
    assert [x.request_id for x in s.ranked(0.0)] == ["tiny", "mid", "long", "huge"]


def test_before_any_measurement_every_job_joins_the_top_queue() -> None:
    s, _, _ = make()
    s.add(seq("a", 5))
    s.add(seq("b", 500))
    assert s.queues()[0] == ["a", "b"]


def test_a_job_that_uses_up_its_quantum_is_demoted_to_the_back_of_the_next_queue() -> None:
    s, _, clock = make(num_queues=4, seqs=1)
    s.add(seq("a", 2))
    levels = []
    for _ in range(8):
        iterate(s, clock)
        levels.append(s.state["a"].level)
    # quanta 1, 2, 4, 8 iterations of 1 s; the bottom queue keeps it
    assert levels == [1, 1, 2, 2, 2, 2, 3, 3]


def test_a_new_short_job_overtakes_a_demoted_long_one_which_keeps_its_kv() -> None:
    s, kv, clock = make(seqs=1)
    long = seq("long", 8)
    s.add(long)
    for _ in range(3):
        iterate(s, clock)
    computed = long.num_computed_tokens
    s.add(seq("short", 3))
    assert ran(iterate(s, clock)) == ["short"]
    assert long.metrics.num_preemptions == 1 and s.num_preemptions == 1
    assert long.num_computed_tokens == computed and kv.num_device_blocks("long") > 0  # no recompute
    assert s.num_running == 1 and s.num_waiting == 1
    iterate(s, clock, finish=frozenset({"short"}))
    assert ran(iterate(s, clock)) == ["long"]


def test_a_starving_job_returns_to_the_top_queue() -> None:
    s, _, clock = make(seqs=1, num_queues=3, starvation_s=5.0)
    s.add(seq("long", 4))
    for _ in range(4):
        iterate(s, clock)
    assert s.state["long"].level == 2
    runs_of_long, k = [], 0
    for i in range(12):  # a new one-iteration job arrives every iteration
        s.add(seq(f"s{i}", 2, max_tokens=1))
        out = iterate(s, clock, finish=frozenset({f"s{j}" for j in range(k, i + 1)}))
        k = i
        runs_of_long.append("long" in ran(out))
    assert any(runs_of_long), "the long job never ran"
    assert s.num_promotions >= 1


def test_the_batch_fills_from_the_top_queue_within_seq_and_token_limits() -> None:
    s, _, clock = make(seqs=2, tokens=10)
    s.add(seq("a", 3))
    iterate(s, clock)  # a demoted to Q1
    s.add(seq("b", 8))
    s.add(seq("c", 8))
    out = iterate(s, clock)
    # b and c are in Q0, ahead of a; c gets what is left of the token budget, a no slot
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("b", 8), ("c", 2)]


def test_a_higher_job_takes_blocks_from_the_lowest_by_swapping_them_out() -> None:
    s, kv, clock = make(num_blocks=6, host_blocks=16, seqs=1)
    low = seq("low", 16)  # 4 blocks, then a fifth as it decodes
    s.add(low)
    iterate(s, clock)
    iterate(s, clock)
    s.add(seq("high", 8))  # 2 blocks: only 1 free
    out = iterate(s, clock, finish=frozenset({"high"}))
    assert ran(out) == ["high"] and out.swapped_out == ["low"]
    assert kv.is_swapped("low") and low.num_computed_tokens == 17
    assert kv.num_swaps_out == 1 and kv.swap_bytes_out == 5 * FakeKVCache(1, 4).block_bytes
    assert ran(iterate(s, clock)) == ["low"] and kv.num_swaps_in == 1 and s.num_recomputations == 0


def test_without_host_room_a_growing_job_sends_the_lowest_to_recomputation() -> None:
    for swap, host in (("off", 16), ("proactive", 0)):
        s, kv, clock = make(num_blocks=6, host_blocks=host, seqs=2, swap=swap)
        top, low = seq("top", 8), seq("low", 15)
        s.add(top)
        s.add(low)
        iterate(s, clock)  # top: 9 tokens, 2 blocks; low: 16 tokens, 4 blocks; none free
        out = iterate(s, clock)  # top's tenth token needs a third block
        assert ran(out) == ["top"] and out.preempted == ["low"] and low.num_computed_tokens == 0
        assert s.num_recomputations == 1 and kv.num_swaps_out == 0


def test_without_host_room_a_newcomer_waits_rather_than_drop_a_cache() -> None:
    for swap, host in (("off", 16), ("proactive", 0)):
        s, kv, clock = make(num_blocks=6, host_blocks=host, seqs=1, swap=swap)
        low = seq("low", 16)
        s.add(low)
        iterate(s, clock)
        iterate(s, clock)  # 17 tokens in 5 blocks
        s.add(seq("high", 8))  # 2 blocks, 1 free: only recomputing low would make room
        out = iterate(s, clock)
        assert ran(out) == ["low"] and not out.preempted and s.num_recomputations == 0
        assert kv.num_swaps_out == 0 and low.num_computed_tokens == 18


def test_a_job_that_cannot_fit_evicts_nobody_and_lower_jobs_still_run() -> None:
    s, kv, clock = make(num_blocks=6, host_blocks=16, seqs=3, base_quantum_s=100.0)
    s.add(seq("top", 8))
    s.add(seq("low", 3))
    iterate(s, clock)  # top: 2 blocks, low: 1 block
    s.state["low"].level = 2
    s.add(seq("x", 13))  # 4 blocks; free 2 after top grows, and low holds only 1
    out = iterate(s, clock)
    assert ran(out) == ["top", "low"]
    assert not out.swapped_out and not out.preempted and kv.num_swaps_out == 0


def test_proactive_keeps_a_reserve_and_prefetches_the_next_to_run() -> None:
    s, kv, clock = make(num_blocks=10, host_blocks=16, seqs=1, reserve=0.2)  # reserve: 2 blocks
    a, b = seq("a", 12), seq("b", 12)
    s.add(a)
    s.add(b)
    out = iterate(s, clock)  # a runs (3 blocks, 4 with its token); 10 - 4 - 0 free
    iterate(s, clock)  # a demoted; b runs: 4 more blocks; 2 free = the reserve
    assert kv.num_free_blocks >= 2 and not out.swapped_out
    s.add(seq("c", 12))  # c runs: needs 4 and must leave 2 free -> the last-to-run are swapped out
    out = iterate(s, clock)
    assert ran(out) == ["c"]
    assert kv.num_free_blocks >= 2
    assert out.swapped_out  # someone was parked in host memory before any allocation failed
    parked = out.swapped_out[0]
    # once c finishes the parked job is swapped back in during the same schedule() call
    s.abort("c")
    s.schedule()
    assert not kv.is_swapped(parked)


def test_reactive_swaps_only_when_an_allocation_fails() -> None:
    s, kv, clock = make(num_blocks=10, host_blocks=16, seqs=1, reserve=0.2, swap="reactive")
    s.add(seq("a", 12))
    s.add(seq("b", 12))
    iterate(s, clock)
    iterate(s, clock)
    s.add(seq("c", 4))  # 2 blocks: fit in the 2 free, nobody is swapped although no reserve is left
    out = iterate(s, clock)
    assert ran(out) == ["c"] and not out.swapped_out and kv.num_swaps_out == 0


def test_abort_frees_device_and_host_blocks() -> None:
    s, kv, clock = make(num_blocks=6, host_blocks=16, seqs=1)
    s.add(seq("low", 16))
    iterate(s, clock)
    iterate(s, clock)
    s.add(seq("high", 8))
    iterate(s, clock)
    assert kv.is_swapped("low")
    assert s.abort("low") is not None and s.abort("high") is not None
    assert kv.num_free_blocks == 6 and kv.host_free_blocks == 16
    assert not s.has_unfinished() and s.abort("low") is None
