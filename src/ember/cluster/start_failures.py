"""StartFailures: why each deployment's instance starts failed, and when the next may try.

A start that fails for a reason a retry can fix (a node that died, a registry that
is down: ember.errors.is_permanent says which) is retried with an exponential
backoff, 1 s doubling to at most 60 s, instead of at every tick; a success forgets
the failures. A start that fails for a reason no retry can fix (a missing or corrupt
checkpoint, a full disk) marks the deployment failed: nothing starts it again until
it is deployed again or deleted. A plain object over an injectable clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ember.backend import ModelState
from ember.errors import is_permanent, public_text

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0


def backoff_s(failures: int) -> float:
    """Seconds to wait after `failures` failed starts in a row: 1, 2, 4, ... 60."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** max(0, failures - 1))


@dataclass
class _Failing:
    error: BaseException
    count: int  # failed starts in a row (starts that ran at the same time count once)
    failed_at: float  # clock time of the last one
    retry_at: float  # clock time before which no start is tried
    permanent: bool


class StartFailures:
    """Per deployment: the failures of its starts since the last success."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failing: dict[str, _Failing] = {}

    def failed(self, name: str, error: BaseException, began: float) -> None:
        """A start of `name` that began at clock time `began` failed with `error`. A
        start that began before the last failure was recorded ran alongside it: it
        does not lengthen the backoff."""
        now = self.clock()
        last = self._failing.get(name)
        permanent = is_permanent(error) or (last is not None and last.permanent)
        if last is not None and began <= last.failed_at:
            last.error, last.permanent = (last.error if last.permanent else error), permanent
            return
        count = 1 if last is None else last.count + 1
        self._failing[name] = _Failing(error, count, now, now + backoff_s(count), permanent)

    def succeeded(self, name: str) -> None:
        """A start of `name` succeeded: its next failure waits 1 s again."""
        failing = self._failing.get(name)
        if failing is not None and not failing.permanent:
            del self._failing[name]

    def forget(self, name: str) -> None:
        """`name` was deployed again or deleted: whatever failed may have been fixed."""
        self._failing.pop(name, None)

    def may_start(self, name: str) -> bool:
        """Whether an instance of `name` may start now."""
        failing = self._failing.get(name)
        return failing is None or (not failing.permanent and self.clock() >= failing.retry_at)

    def permanent(self, name: str) -> BaseException | None:
        """Why `name` can never start, or None."""
        failing = self._failing.get(name)
        return failing.error if failing is not None and failing.permanent else None

    def state(self, name: str, *, ready: bool, min_instances: int) -> ModelState:
        """`name`'s state, given whether one of its instances is `ready`. A deployment
        scaled to zero whose starts have not failed is ready too: a request starts one."""
        failing = self._failing.get(name)
        if ready:
            return ModelState("ready")
        if failing is None:
            return ModelState("ready" if min_instances == 0 else "starting")
        reason = f"{type(failing.error).__name__}: {public_text(failing.error)}"  # /health is open
        if failing.permanent:
            return ModelState("failed", reason=reason)
        wait = max(0.0, failing.retry_at - self.clock())
        return ModelState("starting", reason=f"the last start failed: {reason}", retry_in_s=round(wait, 1))
