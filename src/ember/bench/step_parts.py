"""Where an engine iteration's time goes: the model forward, and the parts around it.

`timed_parts(engine)` wraps, for the duration of a `with` block, the calls an
iteration makes (Engine.step and what it calls) in timers, and adds up each call's
own time (its time minus that of the timed calls inside it) under its part:

- scheduling: the scheduler's schedule() and update(), less the ranking inside them;
- ranking: a ranking policy's ranked() (mlfq, srpt; FCFS keeps its queues in order);
- block tables: the runner's model inputs (token ids, positions, block tables and
  slot mapping as tensors) and the model's attention plan built from them;
- forward: the model's forward and its logits;
- sampling: the sampler;
- detokenising: the incremental detokenizers (text and stop strings);
- other: the rest of step() (outputs, metrics, the iteration-time profile).

The parts of an iteration sum to its wall time. Nothing of the engine changes: the
wrappers are instance attributes (class attributes for the detokenizer, restored on
exit). CPU kernels are synchronous, so a call's wall time is its compute time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.engine import Engine

PARTS = ("scheduling", "ranking", "block tables", "forward", "sampling", "detokenising", "other")


@dataclass
class StepParts:
    """Seconds per part over `iterations` engine steps (see the module docstring)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    iterations: int = 0

    @property
    def step_s(self) -> float:
        """Wall time of the iterations: the parts add up to it."""
        return sum(self.seconds.values())

    @property
    def outside_forward_share(self) -> float:
        """Fraction of the iterations' time spent outside the model forward."""
        total = self.step_s
        return (total - self.seconds["forward"]) / total if total > 0 else 0.0

    def shares(self) -> dict[str, float]:
        """Each part's fraction of the iterations' time."""
        total = self.step_s
        return {part: (s / total if total > 0 else 0.0) for part, s in self.seconds.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "step_s": self.step_s,
            "seconds": dict(self.seconds),
            "shares": self.shares(),
            "outside_forward_share": self.outside_forward_share,
        }


@dataclass
class _Frame:
    part: str
    start: float
    inner: float = 0.0  # seconds of timed calls inside this one


class PartTimer:
    """Nested timers charging each call's own time to its part. `clock`: seconds."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.parts = StepParts()
        self._stack: list[_Frame] = []

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` with its own time charged to `part`."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = _Frame(part, self.clock())
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                elapsed = self.clock() - frame.start
                self.parts.seconds[part] += elapsed - frame.inner
                if self._stack:
                    self._stack[-1].inner += elapsed

        return timed

    def wrap_step(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """An iteration: counted, its own time charged to "other"."""
        timed = self.wrap("other", fn)

        def step(*args: Any, **kwargs: Any) -> Any:
            self.parts.iterations += 1
            return timed(*args, **kwargs)

        return step


def _patch(stack: ExitStack, owner: Any, name: str, replacement: Any, *, on_class: bool = False) -> None:
    """Set owner.name to `replacement` until the stack closes (then put back what was there)."""
    had_own = on_class or name in vars(owner)
    original = vars(owner)[name] if had_own else None
    setattr(owner, name, replacement)
    if had_own:
        stack.callback(setattr, owner, name, original)
    else:  # an instance attribute shadowing the class's method: remove it
        stack.callback(delattr, owner, name)


@contextmanager
def timed_parts(engine: Engine, clock: Callable[[], float] = time.perf_counter) -> Iterator[StepParts]:
    """Time the parts of every engine.step() inside the block; the StepParts fill in
    as the iterations run."""
    timer = PartTimer(clock)
    runner, scheduler, model = engine.runner, engine.scheduler, engine.runner.model
    with ExitStack() as stack:
        _patch(stack, engine, "step", timer.wrap_step(engine.step))
        for name in ("schedule", "update"):
            _patch(stack, scheduler, name, timer.wrap("scheduling", getattr(scheduler, name)))
        if hasattr(scheduler, "ranked"):
            _patch(stack, scheduler, "ranked", timer.wrap("ranking", scheduler.ranked))
        _patch(stack, runner, "_inputs", timer.wrap("block tables", runner._inputs))
        if hasattr(model, "plan"):
            _patch(stack, model, "plan", timer.wrap("block tables", model.plan))
        for name in ("forward", "compute_logits"):
            _patch(stack, model, name, timer.wrap("forward", getattr(model, name)))
        _patch(stack, runner, "sampler", timer.wrap("sampling", runner.sampler))
        for name in ("append", "take_delta"):
            method = vars(IncrementalDetokenizer)[name]
            _patch(stack, IncrementalDetokenizer, name, timer.wrap("detokenising", method), on_class=True)
        yield timer.parts
