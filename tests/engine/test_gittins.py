"""The Gittins index against closed forms, and GittinsScheduler's ranking with fake
sequences, a fake cache and an injectable clock: no model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ember.engine.block_manager import BlockManager
from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.gittins import REFRESH_EVERY, GittinsIndex, GittinsScheduler
from ember.engine.output_lengths import OutputLengths, lengths_path
from ember.engine.prefill_profile import PrefillProfile
from ember.engine.request import EngineRequest, RequestMetrics, SamplingParams
from ember.engine.scheduler import SchedulerOutput
from ember.engine.sequence import Sequence
from ember.engine.swapper import KVSwapper
from tests.engine.fakes import FakeKVCache, FakeModel


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def seq(rid: str, prompt_len: int, generated: int = 0, max_tokens: int = 1000) -> Sequence:
    """A job whose prompt is still to compute, or one that decodes its `generated`-th token."""
    s = Sequence(
        rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), RequestMetrics(0)
    )
    s.output_token_ids = [0] * generated
    s.num_computed_tokens = s.num_tokens - 1 if generated else 0
    return s


def learnt(sizes: list[int]) -> OutputLengths:
    lengths = OutputLengths.prior()
    for n in sizes:
        lengths.observe(n)
    return lengths


HEAVY = [4 + i % 21 if i % 5 else 160 + (7 * i) % 161 for i in range(400)]  # 4-24, one in five 160-320
LIGHT = [90 + i % 21 for i in range(400)]  # 90-110: a job that ran long is about to end


def two_point(s1: int, s2: int, p1: float) -> GittinsIndex:
    """Lengths s1 (probability p1) or s2, on one-token bins."""
    edges = np.arange(1, s2 + 2)
    pmf = np.zeros(s2)
    pmf[s1 - 1], pmf[s2 - 1] = p1, 1 - p1
    reach = 1 - np.concatenate([[0.0], np.cumsum(pmf)])[:-1]  # P(length >= t)
    return GittinsIndex.from_hazards(edges, np.where(reach > 0, pmf / np.maximum(reach, 1e-12), 1.0))


# -- the index --------------------------------------------------------------------------


@pytest.mark.parametrize("mean", [2.0, 128.0, 1000.0])
def test_a_geometric_length_gives_every_job_the_same_index(mean: float) -> None:
    """Memoryless lengths: whatever a job has generated, it ends at rate 1/mean."""
    lengths = OutputLengths.prior(prior_mean=mean)
    g = GittinsIndex.of(lengths)
    far = lengths.edges[:-1] <= lengths.cap // 4  # nearer the cap, where every length ends, more
    assert g.table[far] == pytest.approx(np.full(far.sum(), 1 / mean), rel=1e-9)
    assert {round(math.log(x), 9) for x in g.table[far]} == {round(math.log(1 / mean), 9)}  # ties
    assert (g.table[~far] >= g.table[0] * (1 - 1e-9)).all()
    # a known first stage of r tokens' time: the whole job is the best quantum, 1 / (r + mean)
    assert g.index(0, extra=10.0) == pytest.approx(1 / (10 + mean))


def test_a_geometric_length_on_any_bins_gives_equal_indices() -> None:
    g = GittinsIndex.from_hazards([1, 2, 5, 9, 40, 41, 500], [0.05] * 6)
    assert g.table == pytest.approx(np.full(6, 0.05), rel=1e-9)  # past 500: 0.95^459, nothing


def test_two_point_lengths_drop_the_index_once_the_short_length_passed() -> None:
    g = two_point(4, 100, 0.8)
    # before 4 tokens: run to 4 (finish with probability 0.8) or to the end
    assert g.index(0) == pytest.approx(max(0.8 / 4, 1 / (0.8 * 4 + 0.2 * 100)))
    assert g.index(3) == pytest.approx(0.8)  # the next token ends it with probability 0.8
    for a in (4, 50, 98):  # only 100 is left: the remaining work is known
        assert g.index(a) == pytest.approx(1 / (100 - a))
    assert g.index(4) < g.index(0) / 10
    # when the short length is rare, running to the end is the better quantum
    rare = two_point(4, 10, 0.1)
    assert rare.index(0) == pytest.approx(1 / (0.1 * 4 + 0.9 * 10))


def test_learnt_lengths_set_the_shape_of_the_index() -> None:
    heavy = GittinsIndex.of(learnt(HEAVY))
    assert heavy.index(30) < heavy.index(0) / 4  # past the short ones: probably a long one
    light = GittinsIndex.of(learnt(LIGHT))
    assert light.index(0) < light.index(50) < light.index(95)  # closer to its end


# -- the scheduler -----------------------------------------------------------------------


def make(
    lengths: OutputLengths | None = None,
    *,
    seqs: int = 1,
    num_blocks: int = 256,
    profile: PrefillProfile | None = None,
    **options: Any,
) -> tuple[GittinsScheduler, KVSwapper, Clock]:
    clock = Clock()
    kv = KVSwapper(BlockManager(num_blocks, 4), FakeKVCache(num_blocks, 4), 64, background=False)
    s = GittinsScheduler(
        kv,
        max_num_seqs=seqs,
        max_num_batched_tokens=4096,
        lengths=lengths,
        profile=profile,
        reserve_fraction=0.0,
        clock=clock,
        **options,
    )
    return s, kv, clock


def iterate(s: GittinsScheduler, clock: Clock, finish: frozenset[str] = frozenset()) -> SchedulerOutput:
    """One iteration of 1 s: schedule, sample, update."""
    out = s.schedule()
    clock.now += 1.0
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


def run_for(s: GittinsScheduler, clock: Clock, n: int) -> None:
    for _ in range(n):
        iterate(s, clock)


def test_under_the_prior_jobs_run_first_come_first_served() -> None:
    """Geometric lengths: equal indices, so a new job never preempts a running one."""
    s, _, clock = make(seqs=1)
    s.add(seq("first", 5))
    run_for(s, clock, 30)
    s.add(seq("second", 5))
    for _ in range(5):
        assert ran(iterate(s, clock)) == ["first"]
    assert s.num_preemptions == 0


def test_heavy_tails_let_a_new_job_overtake_a_long_running_one_which_keeps_its_kv() -> None:
    s, kv, clock = make(learnt(HEAVY), seqs=1)
    long = seq("long", 5)
    s.add(long)
    run_for(s, clock, 30)  # past 24 tokens: probably one of the long jobs
    computed = long.num_computed_tokens
    s.add(seq("new", 5))
    assert ran(iterate(s, clock)) == ["new"]
    assert long.metrics.num_preemptions == 1 and long.num_computed_tokens == computed
    assert kv.num_device_blocks("long") > 0  # not recomputed
    iterate(s, clock, finish=frozenset({"new"}))
    assert ran(iterate(s, clock)) == ["long"]


def test_light_tails_keep_the_running_job_running() -> None:
    s, _, clock = make(learnt(LIGHT), seqs=1)
    s.add(seq("old", 5))
    run_for(s, clock, 30)
    s.add(seq("new", 5))
    for _ in range(5):
        assert ran(iterate(s, clock)) == ["old"]
    assert s.num_preemptions == 0


def test_the_ranking_never_reads_max_tokens() -> None:
    """srpt would put the job with max_tokens=1 first; gittins cannot know it."""
    orders = []
    for short in ("a", "b"):
        s, _, clock = make(learnt(HEAVY), seqs=2)
        for rid, generated in (("a", 0), ("b", 0), ("c", 30)):
            s.add(seq(rid, 5, generated, max_tokens=generated + (1 if rid == short else 500)))
        orders.append([x.request_id for x in s.ranked(clock())])
    assert orders[0] == orders[1] == ["a", "b", "c"]


def profile_with(prefill_s_per_token: float, decode_s: float) -> PrefillProfile:
    profile = PrefillProfile()
    for n in (10, 100, 400, 1000, 2000):
        profile.observe([n], [0], n * prefill_s_per_token)
    for _ in range(5):
        profile.observe([1], [50], decode_s)
    return profile


def test_a_new_jobs_predicted_prefill_sets_its_first_rank() -> None:
    """Skip-join: a short prompt joins ahead of a long-running job, a prompt whose
    prefill costs hundreds of decode iterations behind it."""
    profile = profile_with(1e-3, 0.01)  # a 2000-token prefill: 2 s, 200 decode iterations
    s, _, clock = make(learnt(HEAVY), seqs=1, profile=profile)
    s.add(seq("decoding", 5, generated=30))
    s.add(seq("long-prompt", 2000))
    s.add(seq("short-prompt", 20))
    assert [x.request_id for x in s.ranked(clock())] == ["short-prompt", "decoding", "long-prompt"]
    assert s.prefill_extra(s.jobs["long-prompt"]) == pytest.approx(199, rel=0.05)
    assert s.prefill_extra(s.jobs["decoding"]) == 0.0


def test_a_starving_job_runs_again() -> None:
    s, _, clock = make(learnt(HEAVY), seqs=1, starvation_s=5.0)
    s.add(seq("long", 5))
    run_for(s, clock, 30)
    runs_of_long = []
    for i in range(12):  # a new one-iteration job arrives every iteration
        s.add(seq(f"s{i}", 2))
        out = iterate(s, clock, finish=frozenset(f"s{j}" for j in range(i + 1)))
        runs_of_long.append("long" in ran(out))
    assert 1 <= sum(runs_of_long) <= 3 and s.num_promotions >= 1
    never, _, clock = make(learnt(HEAVY), seqs=1, starvation_s=1e9)  # without the guard: never
    never.add(seq("long", 5))
    run_for(never, clock, 30)
    for i in range(12):
        never.add(seq(f"s{i}", 2))
        assert ran(iterate(never, clock, finish=frozenset(f"s{j}" for j in range(i + 1)))) == [f"s{i}"]


def test_the_running_jobs_count_as_censored_lengths() -> None:
    lengths = learnt([5] * 40)
    s, _, clock = make(lengths, seqs=4)
    for i in range(4):
        s.add(seq(f"r{i}", 3))
    run_for(s, clock, REFRESH_EVERY)  # the next ranking recomputes the index
    running = [x.num_generated for x in s.jobs.values()]
    assert min(running) > 5
    assert s.gittins.table == pytest.approx(GittinsIndex.of(lengths, running).table)
    assert not np.allclose(s.gittins.table, GittinsIndex.of(lengths).table)


# -- the engine feeds it -----------------------------------------------------------------


def engine(lengths: OutputLengths | None = None, **cfg: Any) -> Engine:
    config = EngineConfig(device="cpu", block_size=4, scheduler="gittins", **cfg)
    return Engine(FakeModel(), FakeKVCache(64, 4), config, eos_token_ids=[], lengths=lengths)


def test_the_engine_learns_finished_lengths_and_aborts_as_censored() -> None:
    e = engine()
    for i in range(8):
        e.add_request(EngineRequest.make(f"r{i}", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3)))
    e.add_request(EngineRequest.make("cut", [1, 2], SamplingParams(temperature=0, max_tokens=50)))
    cut_tokens = 0
    while cut_tokens < 6:  # by then the others have finished
        cut_tokens += sum(len(o.outputs[0].token_ids) for o in e.step() if o.request_id == "cut")
    assert e.abort("cut") is not None
    assert e.lengths.count == 9
    assert e.lengths.survival()[e.lengths.bin_of(4)] < 0.5  # most ended at 3 tokens
    reached, deaths, _ = e.lengths.counts[:, e.lengths.bin_of(5)]
    assert reached == pytest.approx(1, rel=0.01) and deaths == 0  # the aborted one: past 5, censored


def test_close_saves_the_lengths_of_a_model_and_a_prior_writes_nothing(ember_home: Path) -> None:
    path = lengths_path("fake", "cpu", "float32")
    e = engine(OutputLengths(path))
    e.add_request(EngineRequest.make("r", [1, 2], SamplingParams(temperature=0, max_tokens=4)))
    while e.has_unfinished():
        e.step()
    e.close()
    assert OutputLengths(path).count == 1
    path.unlink()
    e = engine()  # the prior, in memory
    e.add_request(EngineRequest.make("r", [1, 2], SamplingParams(temperature=0, max_tokens=4)))
    while e.has_unfinished():
        e.step()
    e.close()
    assert not list(ember_home.rglob("*.lengths.json"))
