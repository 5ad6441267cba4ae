"""Sampler: greedy, cuts, penalties, seeded draws and exportable random state."""

from __future__ import annotations

import pickle

import pytest
import torch

from ember.engine.request import SamplingParams
from ember.engine.sampler import (
    Sampler,
    SamplingRow,
    _filtered_probs,
    export_state,
    import_state,
    new_generator,
)

LOGITS = torch.tensor([[0.0, 2.0, 1.0, 3.0, -1.0]])  # most likely: 3, then 1, then 2


def draw(params: SamplingParams, n: int, seed: int = 0, logits: torch.Tensor = LOGITS) -> list[int]:
    g, sampler = new_generator(seed), Sampler()
    return [sampler(logits, [SamplingRow(params, [], g)])[0].token_id for _ in range(n)]


def test_greedy_and_degenerate_cuts_pick_the_most_likely_token() -> None:
    assert draw(SamplingParams(temperature=0), 3) == [3, 3, 3]
    assert set(draw(SamplingParams(top_k=1), 50)) == {3}
    assert set(draw(SamplingParams(top_p=0.01), 50)) == {3}


def test_top_k_and_top_p_keep_only_the_head_of_the_distribution() -> None:
    assert set(draw(SamplingParams(top_k=2), 300)) == {1, 3}
    probs = torch.softmax(LOGITS[0], -1)  # p(3)=0.64, p(1)=0.24: top_p 0.8 keeps {3, 1}
    assert probs[3] < 0.8 < probs[3] + probs[1]
    assert set(draw(SamplingParams(top_p=0.8), 300)) == {1, 3}


def test_draws_follow_the_distribution() -> None:
    tokens = draw(SamplingParams(temperature=1.0), 4000, seed=1)
    freq = torch.bincount(torch.tensor(tokens), minlength=5).double() / len(tokens)
    assert torch.allclose(freq, torch.softmax(LOGITS[0].double(), -1), atol=0.03)


def test_same_seed_same_tokens_and_state_round_trips() -> None:
    p = SamplingParams(temperature=1.0)
    assert draw(p, 20, seed=5) == draw(p, 20, seed=5) != draw(p, 20, seed=6)
    g, sampler = new_generator(9), Sampler()
    first = [sampler(LOGITS, [SamplingRow(p, [], g)])[0].token_id for _ in range(10)]
    state = pickle.loads(pickle.dumps(export_state(g)))
    rest = [sampler(LOGITS, [SamplingRow(p, [], g)])[0].token_id for _ in range(10)]
    g2 = import_state(state)
    assert [sampler(LOGITS, [SamplingRow(p, [], g2)])[0].token_id for _ in range(10)] == rest
    assert first + rest == draw(p, 20, seed=9)


def test_penalties_and_bias_follow_openai() -> None:
    sampler = Sampler()
    greedy = SamplingParams(temperature=0)
    # token 3 generated twice: 3.0 - 2 * 0.6 - 0.5 = 1.3 < 2.0 (token 1)
    p = SamplingParams(temperature=0, frequency_penalty=0.6, presence_penalty=0.5)
    assert sampler(LOGITS, [SamplingRow(p, [3, 3], new_generator(0))])[0].token_id == 1
    p = SamplingParams(temperature=0, frequency_penalty=0.2)
    assert sampler(LOGITS, [SamplingRow(p, [3, 3], new_generator(0))])[0].token_id == 3
    p = SamplingParams(temperature=0, logit_bias={4: 5.0})
    assert sampler(LOGITS, [SamplingRow(p, [], new_generator(0))])[0].token_id == 4
    assert sampler(LOGITS, [SamplingRow(greedy, [3], new_generator(0))])[0].token_id == 3


def test_logprobs_are_of_the_raw_distribution() -> None:
    p = SamplingParams(temperature=0, logprobs=True, top_logprobs=2, logit_bias={4: 10.0})
    r = Sampler()(LOGITS, [SamplingRow(p, [], new_generator(0))])[0]
    raw = torch.log_softmax(LOGITS[0], -1)
    assert r.token_id == 4 and r.logprob == pytest.approx(float(raw[4]))
    assert [t for t, _ in r.top_logprobs] == [3, 1]
    assert r.top_logprobs[0][1] == pytest.approx(float(raw[3]))


def test_rows_are_independent_in_a_batch() -> None:
    p = SamplingParams(temperature=1.0)
    batch = torch.cat([LOGITS, LOGITS.flip(-1)])
    ga, gb = new_generator(1), new_generator(2)
    together = [Sampler()(batch, [SamplingRow(p, [], ga), SamplingRow(p, [], gb)]) for _ in range(10)]
    assert [r[0].token_id for r in together] == draw(p, 10, seed=1)
    assert [r[1].token_id for r in together] == draw(p, 10, seed=2, logits=LOGITS.flip(-1))


@pytest.mark.parametrize("spread", [0.2, 3.0])  # flat: the nucleus is thousands of tokens; peaked: a few
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.95])
def test_top_p_keeps_the_smallest_most_likely_set_reaching_top_p(spread: float, top_p: float) -> None:
    """The nucleus, against its definition computed by sorting the whole vocabulary,
    whether it lies within the ranked candidates or needs the full sort."""
    logits = torch.randn(5000, generator=torch.Generator().manual_seed(7)) * spread
    probs = _filtered_probs(logits, SamplingParams(temperature=1.0, top_p=top_p, max_tokens=1))
    full = torch.softmax(logits, dim=-1)
    ranked, order = torch.sort(full, descending=True)
    size = int((torch.cumsum(ranked, dim=-1) < top_p).sum()) + 1  # tokens until the mass reaches top_p
    expected = torch.zeros_like(full)
    expected[order[:size]] = ranked[:size]
    assert torch.equal(probs.nonzero(), expected.nonzero())
    assert torch.allclose(probs, expected)
