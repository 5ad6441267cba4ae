"""SamplingParams validation and the picklable messages."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from ember.engine.request import EngineRequest, SamplingParams
from ember.errors import InvalidRequestError


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param and info.value.status == 400


def test_params_are_normalised_and_picklable() -> None:
    p = SamplingParams(stop="END", top_k=-1, top_logprobs=2, logit_bias={"5": 1})  # type: ignore[dict-item]
    assert p.stop == ("END",) and p.top_k == 0 and p.logprobs and p.logit_bias == {5: 1.0}
    r = EngineRequest.make("a", [1, 2], p, output_token_ids=[3], sampler_state=b"s")
    assert pickle.loads(pickle.dumps(r)) == r


def test_a_sampling_request_without_a_seed_gets_a_fresh_one_at_admission() -> None:
    p = SamplingParams(temperature=1.0)
    a, b = EngineRequest.make("a", [1], p), EngineRequest.make("b", [1], p)
    assert a.sampling_params.seed is not None and b.sampling_params.seed is not None
    assert a.sampling_params.seed != b.sampling_params.seed
    assert dataclasses.replace(a, request_id="c").sampling_params == a.sampling_params  # kept on copies
    assert pickle.loads(pickle.dumps(a)) == a  # and across processes
    assert EngineRequest.make("s", [1], SamplingParams(temperature=1.0, seed=3)).sampling_params.seed == 3
    assert EngineRequest.make("g", [1], SamplingParams(temperature=0)).sampling_params.seed is None
