"""The engine loop on a fake paged model: batching, chunking, preemption and resume
must never change a request's tokens."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.request import EngineRequest, RequestOutput, SamplingParams
from ember.engine.sampler import state_after
from ember.errors import ContextLengthError, InvalidRequestError, UnsupportedFeatureError
from tests.engine.fakes import FakeKVCache, FakeModel, reference_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=12)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=7, max_tokens=12)
UNSEEDED = SamplingParams(temperature=1.0, max_tokens=12)
PROMPTS = [[5, 6, 7], list(range(1, 40)), [42], list(range(10, 27))]


def engine(num_blocks: int = 256, block_size: int = 4, **cfg: object) -> Engine:
    config = EngineConfig(device="cpu", block_size=block_size, **cfg)  # type: ignore[arg-type]
    return Engine(FakeModel(), FakeKVCache(num_blocks, block_size), config, eos_token_ids=[])


def run(e: Engine, requests: list[EngineRequest]) -> dict[str, list[int]]:
    for r in requests:
        e.add_request(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    while e.has_unfinished():
        for out in e.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return tokens


def reqs(params: SamplingParams, prompts: list[list[int]] = PROMPTS) -> list[EngineRequest]:
    return [EngineRequest.make(f"r{i}", p, params) for i, p in enumerate(prompts)]


def alone(params: SamplingParams) -> dict[str, list[int]]:
    out = {}
    for r in reqs(params):
        out |= run(engine(), [r])
    return out


def test_greedy_tokens_follow_the_model() -> None:
    got = run(engine(), reqs(GREEDY))
    assert got == {f"r{i}": reference_greedy(p, 12) for i, p in enumerate(PROMPTS)}


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_batching_chunking_and_preemption_do_not_change_tokens(params: SamplingParams) -> None:
    expected = alone(params)
    assert run(engine(), reqs(params)) == expected
    assert run(engine(max_num_batched_tokens=7), reqs(params)) == expected
    tight = engine(num_blocks=16, block_size=4)  # 64 slots for 4 requests of up to 51 tokens
    assert run(tight, reqs(params)) == expected
    assert tight.scheduler.num_preemptions > 0


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    a = run(engine(), reqs(SEEDED))
    b = run(engine(), reqs(SEEDED))
    other = run(engine(), reqs(SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=8, max_tokens=12)))
    assert a == b
    assert a != other


def test_unseeded_requests_get_fresh_randomness_in_every_new_engine() -> None:
    # each engine is what a new process builds: before seeds were drawn at admission,
    # every engine drew the same sequence of seeds, so a new run repeated the old text
    runs = [run(engine(), reqs(UNSEEDED)) for _ in range(2)]
    assert runs[0]["r1"] != runs[1]["r1"]
    assert len({tuple(t) for t in runs[0].values()} | {tuple(t) for t in runs[1].values()}) == 8


@pytest.mark.parametrize("params", [GREEDY, SEEDED, UNSEEDED], ids=["greedy", "seeded", "unseeded"])
def test_a_job_resumed_from_its_tokens_continues_exactly(params: SamplingParams) -> None:
    request = reqs(params)[1]  # one admission: an unseeded request's drawn seed is in it
    expected = run(engine(), [request])["r1"]
    source = engine()
    source.add_request(request)
    streamed: list[int] = []
    while len(streamed) < 5:
        for out in source.step():
            streamed += out.outputs[0].token_ids
    aborted = source.abort("r1")
    assert aborted is not None
    last, snapshot = aborted
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert source.blocks.num_free_blocks == source.blocks.num_blocks
    snapshot = pickle.loads(pickle.dumps(snapshot))  # it travels to another instance
    resumed = EngineRequest.make(
        "r1",
        snapshot.prompt_token_ids,
        snapshot.sampling_params,
        output_token_ids=snapshot.output_token_ids,
        sampler_state=snapshot.sampler_state,
    )
    assert streamed + run(engine(), [resumed])["r1"] == expected
    if params.greedy:
        return
    # fail-over has no snapshot (the node is gone): the state is rebuilt from the seed
    seed = snapshot.sampling_params.seed
    assert seed is not None
    rebuilt = dataclasses.replace(resumed, sampler_state=state_after(seed, len(streamed)))
    assert streamed + run(engine(), [rebuilt])["r1"] == expected


def test_length_stop_token_and_context_limits_finish_requests() -> None:
    e = engine()
    e.add_request(EngineRequest.make("a", [1, 2], SamplingParams(temperature=0, max_tokens=3)))
    outs: list[RequestOutput] = []
    while e.has_unfinished():
        outs += e.step()
    assert [o.finished for o in outs] == [False, False, True]
    assert outs[-1].outputs[0].finish_reason == "length"

    stop_at = reference_greedy([1, 2], 5)[2]
    got = run(
        engine(), [EngineRequest.make("b", [1, 2], SamplingParams(temperature=0, stop_token_ids=[stop_at]))]
    )
    assert got["b"] == reference_greedy([1, 2], 3)

    short = engine(max_model_len=6)
    got = run(short, [EngineRequest.make("c", [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=50))])
    assert len(got["c"]) == 2


@pytest.mark.parametrize(
    ("request_", "error", "match"),
    [
        (EngineRequest.make("x", [], GREEDY), InvalidRequestError, "empty"),
        (EngineRequest.make("x", [1, 97], GREEDY), InvalidRequestError, "outside the vocabulary"),
        (EngineRequest.make("x", [-1], GREEDY), InvalidRequestError, "outside the vocabulary"),
        (EngineRequest.make("x", list(range(64)), GREEDY), ContextLengthError, "context holds 64"),
        (EngineRequest.make("x", [1], SamplingParams(n=2)), UnsupportedFeatureError, "one completion"),
        (
            EngineRequest.make("x", [1], SamplingParams(stop_token_ids=[500])),
            InvalidRequestError,
            "stop_token_ids",
        ),
        (EngineRequest.make("x", [1], GREEDY, sampler_state=b"junk"), InvalidRequestError, "sampler_state"),
    ],
)
def test_bad_requests_are_refused_and_the_engine_goes_on(
    request_: EngineRequest, error: type[Exception], match: str
) -> None:
    e = engine(max_model_len=64)
    e.add_request(reqs(GREEDY)[0])
    with pytest.raises(error, match=match):
        e.add_request(request_)
    assert run(e, []) == {"r0": reference_greedy(PROMPTS[0], 12)}


def test_logprobs_and_penalties() -> None:
    e = engine()
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=True, top_logprobs=3)
    e.add_request(EngineRequest.make("a", [1, 2], params))
    outs = []
    while e.has_unfinished():
        outs += e.step()
    for out in outs:
        (lp,) = out.outputs[0].logprobs or []
        assert lp.chosen.token_id == out.outputs[0].token_ids[0]
        assert lp.top[0].token_id == lp.chosen.token_id  # greedy picks the most likely
        assert lp.chosen.logprob == pytest.approx(lp.top[0].logprob)
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob

    # a strong negative bias on the greedy choice moves it elsewhere
    first = reference_greedy([1, 2], 1)[0]
    biased = SamplingParams(temperature=0, max_tokens=1, logit_bias={first: -100})
    assert run(engine(), [EngineRequest.make("b", [1, 2], biased)])["b"] != [first]
