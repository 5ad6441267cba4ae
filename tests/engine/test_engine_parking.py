"""Parked sequences (live migration's destination side): the cache of a request's
tokens computed in rounds without sampling, then taken over exactly; never leaked."""

from __future__ import annotations

from typing import Any

import pytest

from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.policies import POLICY_NAMES
from ember.engine.request import EngineRequest, SamplingParams
from tests.cluster.fakes import FakeClock
from tests.engine.fakes import FakeKVCache, FakeModel

GREEDY = SamplingParams(temperature=0, max_tokens=20)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=20)
PROMPTS = [list(range(1, 30)), [5, 6, 7], list(range(40, 57))]


def engine(scheduler: str = "mlfq", clock: FakeClock | None = None) -> Engine:
    config = EngineConfig(device="cpu", block_size=4, scheduler=scheduler)
    return Engine(FakeModel(), FakeKVCache(128, 4), config, clock=clock or FakeClock())


def drain(e: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while e.has_unfinished():
        for out in e.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return tokens


@pytest.mark.parametrize("scheduler", POLICY_NAMES)
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_moved_in_rounds_onto_parked_caches_continues_exactly(
    scheduler: str, params: SamplingParams
) -> None:
    expected = drain(_with(engine(scheduler), params))
    source, dest = _with(engine(scheduler), params), engine(scheduler)
    dest.add_request(EngineRequest.make("other", [9, 9, 9], params))  # the destination is busy too
    streamed: dict[str, list[int]] = {"r0": [], "r1": [], "r2": []}
    while min(len(t) for t in streamed.values()) < 2:
        for out in source.step():
            streamed[out.request_id] += out.outputs[0].token_ids
    for rid, prompt in zip(("r0", "r1", "r2"), PROMPTS, strict=True):  # round 1: tokens so far
        dest.add_request(EngineRequest.make(rid, prompt, params, output_token_ids=streamed[rid], park=True))
    drain_parking(dest)
    parked = dict(dest.take_parked())
    ids = ("r0", "r1", "r2")
    assert parked == {rid: len(p) + len(streamed[rid]) for rid, p in zip(ids, PROMPTS, strict=True)}
    for out in source.step() + source.step():  # the source went on meanwhile
        streamed[out.request_id] += out.outputs[0].token_ids
    for rid, prompt in zip(("r0", "r1", "r2"), PROMPTS, strict=True):  # round 2: only the new tokens
        dest.add_request(EngineRequest.make(rid, prompt, params, output_token_ids=streamed[rid], park=True))
    drain_parking(dest)
    assert dest.num_parked == 3
    for rid in ("r0", "r1", "r2"):  # stop on the source, continue on the destination
        aborted = source.abort(rid)
        assert aborted is not None
        snap = aborted[1]
        dest.add_request(
            EngineRequest.make(
                rid, snap.prompt_token_ids, params,
                output_token_ids=snap.output_token_ids, sampler_state=snap.sampler_state,
            )
        )  # fmt: skip
    rest = drain(dest)
    assert {rid: streamed[rid] + rest[rid] for rid in streamed} == expected
    assert dest.num_parked == 0 and dest.blocks.num_free_blocks == dest.blocks.num_blocks


def _with(e: Engine, params: SamplingParams) -> Engine:
    for i, p in enumerate(PROMPTS):
        e.add_request(EngineRequest.make(f"r{i}", p, params))
    return e


def drain_parking(e: Engine) -> None:
    """Step until only the unrelated request remains (the parking ones are parked)."""
    for _ in range(100):
        if e.num_parked == 3 and e.num_running + e.num_waiting <= 1:
            return
        e.step()
    raise AssertionError("the parking requests never parked")


def test_a_parked_cache_that_does_not_match_is_recomputed() -> None:
    expected = drain(_with(engine(), GREEDY))["r0"]
    e = engine()
    e.add_request(EngineRequest.make("r0", [3, 3, 3, 3, 3], GREEDY, park=True))
    e.step()
    assert e.take_parked() == [("r0", 5)]
    e.add_request(EngineRequest.make("r0", PROMPTS[0], GREEDY))
    assert drain(e)["r0"] == expected


def test_parked_caches_are_freed_by_abort_and_by_age() -> None:
    clock = FakeClock()
    e = engine(clock=clock)
    e.add_request(EngineRequest.make("a", PROMPTS[0], GREEDY, park=True))
    e.add_request(EngineRequest.make("b", PROMPTS[1], GREEDY, park=True))
    e.step()
    assert e.num_parked == 2 and not e.has_unfinished() and e.blocks.num_free_blocks < e.blocks.num_blocks
    assert e.abort("a") is None and e.num_parked == 1
    clock.advance(e.park_ttl_s - 1)
    assert e.expire_parked() == []
    clock.advance(1)
    assert e.expire_parked() == ["b"]
    assert e.num_parked == 0 and e.blocks.num_free_blocks == e.blocks.num_blocks


def test_parking_again_with_no_new_tokens_parks_at_once() -> None:
    e = engine()
    e.add_request(EngineRequest.make("a", PROMPTS[1], GREEDY, park=True))
    e.step()
    e.take_parked()
    e.add_request(EngineRequest.make("a", PROMPTS[1], GREEDY, park=True))
    assert e.take_parked() == [("a", 3)] and not e.has_unfinished()


def test_a_take_over_computes_only_the_tokens_after_the_parked_ones() -> None:
    e = engine()
    computed: list[tuple[str, int, int]] = []  # (id, first position, tokens) per iteration
    execute = e.runner.execute

    def recording(batch: Any) -> Any:
        computed.extend((s.seq.request_id, s.start, s.num_new_tokens) for s in batch.scheduled)
        return execute(batch)

    e.runner.execute = recording  # type: ignore[method-assign]
    prompt, outputs = PROMPTS[0], [3, 4, 5, 6, 7]
    e.add_request(EngineRequest.make("m", prompt, GREEDY, output_token_ids=outputs[:2], park=True))
    drain(e)
    e.add_request(EngineRequest.make("m", prompt, GREEDY, output_token_ids=outputs[:4], park=True))
    drain(e)
    e.add_request(EngineRequest.make("m", prompt, GREEDY, output_token_ids=outputs))
    first = len(computed)
    drain(e)
    n = len(prompt)
    assert computed[:first] == [("m", 0, n + 2), ("m", n + 2, 2)]  # round 2: only the new tokens
    assert computed[first] == ("m", n + 4, 1)  # the hand-over: the last token, then decodes
