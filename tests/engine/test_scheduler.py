"""FCFS scheduling with fake sequences and a small block pool: no model."""

from __future__ import annotations

from ember.engine.block_manager import BlockManager
from ember.engine.request import RequestMetrics, SamplingParams
from ember.engine.scheduler import FCFSScheduler, SchedulerOutput
from ember.engine.sequence import Sequence, SequenceStatus


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def seq(rid: str, prompt_len: int, t: float = 0.0) -> Sequence:
    return Sequence(rid, list(range(1, prompt_len + 1)), SamplingParams(), RequestMetrics(t))


def make(
    num_blocks: int = 64, block_size: int = 4, seqs: int = 8, tokens: int = 64
) -> tuple[FCFSScheduler, BlockManager, Clock]:
    blocks, clock = BlockManager(num_blocks, block_size), Clock()
    return FCFSScheduler(blocks, max_num_seqs=seqs, max_num_batched_tokens=tokens, clock=clock), blocks, clock


def iterate(s: FCFSScheduler, finish: set[str] = frozenset()) -> SchedulerOutput:  # type: ignore[assignment]
    """One iteration as the engine does it: schedule, append a token to samplers, update."""
    out = s.schedule()
    done = []
    for item in out.scheduled:
        if item.samples:
            item.seq.output_token_ids.append(0)
            if item.seq.request_id in finish:
                done.append(item.seq.request_id)
    s.update(out, done)
    return out


def plan(out: SchedulerOutput) -> dict[str, int]:
    return {x.seq.request_id: x.num_new_tokens for x in out.scheduled}


def test_jobs_join_and_leave_between_iterations() -> None:
    s, blocks, _ = make()
    s.add(seq("a", 5))
    assert plan(iterate(s)) == {"a": 5}
    s.add(seq("b", 3))
    assert plan(iterate(s)) == {"a": 1, "b": 3}  # decode and prefill in one batch
    assert plan(iterate(s, finish={"a"})) == {"a": 1, "b": 1}
    assert plan(iterate(s)) == {"b": 1}
    assert blocks.block_table("a") == []  # a's blocks went back to the pool


def test_long_prompt_is_prefilled_in_chunks_and_samples_only_at_the_end() -> None:
    s, _, _ = make(tokens=32)
    a = seq("a", 100)
    s.add(a)
    chunks = []
    for _ in range(4):
        out = iterate(s)
        chunks.append((out.scheduled[0].num_new_tokens, len(a.output_token_ids)))
    assert chunks == [(32, 0), (32, 0), (32, 0), (4, 1)]
    assert plan(iterate(s)) == {"a": 1}


def test_token_budget_is_shared_in_arrival_order() -> None:
    s, _, _ = make(tokens=10)
    s.add(seq("a", 4))
    iterate(s)
    s.add(seq("b", 20))
    s.add(seq("c", 2))
    out = iterate(s)
    assert plan(out) == {"a": 1, "b": 9}  # c waits: the budget is spent
    assert out.num_batched_tokens == 10


def test_max_num_seqs_bounds_the_batch() -> None:
    s, _, _ = make(seqs=2)
    for r in "abc":
        s.add(seq(r, 2))
    assert set(plan(iterate(s))) == {"a", "b"}
    assert s.num_waiting == 1
    iterate(s, finish={"a"})
    assert set(plan(iterate(s))) == {"b", "c"}


def test_waiting_jobs_never_overtake_the_head_of_the_queue() -> None:
    s, _, _ = make(num_blocks=4, block_size=4)
    s.add(seq("a", 8))
    iterate(s)
    s.add(seq("big", 12))  # needs 3 blocks, only 2 free
    s.add(seq("small", 2))
    assert plan(iterate(s)) == {"a": 1}
    assert [x.request_id for x in s.waiting] == ["big", "small"]


def test_out_of_blocks_preempts_the_latest_job_which_recomputes_later() -> None:
    s, blocks, _ = make(num_blocks=4, block_size=4)
    a, b = seq("a", 7), seq("b", 7)
    s.add(a)
    s.add(b)
    assert plan(iterate(s)) == {"a": 7, "b": 7}  # 2 blocks each: the pool is full
    assert blocks.num_free_blocks == 0
    assert plan(iterate(s)) == {"a": 1, "b": 1}  # each computes its 8th token: still 2 blocks
    out = iterate(s)  # a's 9th token needs a third block
    assert plan(out) == {"a": 1}
    assert out.preempted == ["b"]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.metrics.num_preemptions == 1 and s.num_preemptions == 1
    assert list(s.waiting) == [b]
    # b comes back once a finishes, recomputing prompt + its 2 generated tokens in one prefill
    iterate(s, finish={"a"})
    out = iterate(s)
    assert plan(out) == {"b": 9}
    assert out.scheduled[0].samples and len(b.output_token_ids) == 3


def test_a_job_that_alone_cannot_grow_is_put_back_and_retried() -> None:
    s, blocks, _ = make(num_blocks=2, block_size=4)
    a = seq("a", 8)
    s.add(a)
    iterate(s)
    out = s.schedule()
    assert out.preempted == ["a"] and out.is_empty
    assert blocks.num_free_blocks == 2


def test_abort_frees_blocks_of_running_and_waiting_jobs() -> None:
    s, blocks, _ = make(num_blocks=8)
    s.add(seq("a", 9))
    iterate(s)
    s.add(seq("b", 2))
    assert s.abort("a") is not None
    assert blocks.num_free_blocks == 8
    assert s.abort("b") is not None and s.abort("nobody") is None
    assert not s.has_unfinished()


def test_first_scheduled_time_comes_from_the_injected_clock() -> None:
    s, _, clock = make(seqs=1)
    a, b = seq("a", 2), seq("b", 2)
    s.add(a)
    s.add(b)
    clock.now = 5.0
    iterate(s, finish={"a"})
    clock.now = 7.5
    iterate(s)
    assert (a.metrics.first_scheduled_time, b.metrics.first_scheduled_time) == (5.0, 7.5)
