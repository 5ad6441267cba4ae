"""ember.bench.step_parts: an iteration's time split into parts that add up to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ember import LLM, SamplingParams
from ember.bench.step_parts import PARTS, PartTimer, timed_parts
from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.engine import Engine
from ember.engine.sampler import Sampler

pytestmark = pytest.mark.timeout(120)


class TickClock:
    """Each reading one second after the last: a call's time is the readings inside it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_nested_calls_charge_their_own_time_and_the_parts_add_up() -> None:
    timer = PartTimer(TickClock())
    ranked = timer.wrap("ranking", lambda: None)  # 2 readings: 1 s

    def schedule_body() -> None:
        ranked()
        ranked()

    schedule = timer.wrap("scheduling", schedule_body)  # readings 1..6: 5 s, 2 s of it ranking
    forward = timer.wrap("forward", lambda: None)  # readings 7, 8: 1 s

    def step_body() -> None:
        schedule()
        forward()

    step = timer.wrap_step(step_body)  # readings 0..9: 9 s, 6 s of it in the calls above
    step()
    step()
    parts = timer.parts
    assert parts.iterations == 2
    assert parts.seconds == {
        "scheduling": 2 * 3.0, "ranking": 2 * 2.0, "block tables": 0.0, "forward": 2 * 1.0,
        "sampling": 0.0, "detokenising": 0.0, "other": 2 * 3.0,
    }  # fmt: skip
    assert parts.step_s == 2 * 9.0  # the parts add up to the steps' wall time
    assert parts.outside_forward_share == pytest.approx(16.0 / 18.0)
    assert sum(parts.shares().values()) == pytest.approx(1.0)


def test_a_call_that_raises_is_still_charged() -> None:
    timer = PartTimer(TickClock())

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        timer.wrap("sampling", fail)()
    assert timer.parts.seconds["sampling"] == 1.0 and timer.parts.iterations == 0


@pytest.fixture(scope="module")
def llm(tiny_llama: tuple[Path, Any]) -> LLM:
    return LLM(str(tiny_llama[0]), device="cpu")


def test_timed_parts_of_a_real_generate_add_up_and_leave_the_engine_as_it_was(llm: LLM) -> None:
    engine = llm.engine
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    steps = 0
    step = engine.step

    def counted() -> Any:
        nonlocal steps
        steps += 1
        return step()

    engine.step = counted  # type: ignore[method-assign]
    try:
        with timed_parts(engine) as parts:
            out = llm.generate(["The quick brown fox", "1 2 3"], greedy)
    finally:
        del engine.step
    assert [len(o.outputs[0].token_ids) for o in out] == [4, 4]
    assert parts.iterations == steps >= 4  # one prefill iteration samples the first token
    assert set(parts.seconds) == set(PARTS)
    assert all(s >= 0 for s in parts.seconds.values())
    for part in ("scheduling", "ranking", "block tables", "forward", "sampling", "detokenising"):
        assert parts.seconds[part] > 0, part  # every part was reached (mlfq ranks)
    assert parts.step_s == pytest.approx(sum(parts.seconds.values()))
    assert 0 < parts.outside_forward_share < 1
    # nothing left behind: the engine's own methods, the detokenizer's class methods
    assert "step" not in vars(engine) and "forward" not in vars(engine.runner.model)
    assert not {"schedule", "update", "ranked"} & set(vars(engine.scheduler))
    assert isinstance(engine.runner.sampler, Sampler)
    assert IncrementalDetokenizer.append.__qualname__ == "IncrementalDetokenizer.append"
    assert Engine.step.__qualname__ == "Engine.step"
    again = llm.generate(["The quick brown fox"], greedy)  # and it still runs
    assert again[0].outputs[0].token_ids == out[0].outputs[0].token_ids
