"""/health's answer: 200 only when every served model can serve; otherwise 503 with
each model's state (starting, importing with its progress, ready, failed with the
reason), so a load balancer or an operator sees which model holds the server up.
/health needs no key, so reasons come without server paths (`public_text`).

    {"status": "starting", "message": "importing the model, 42% done",
     "models": {"smollm2-135m-instruct": {"state": "importing", "progress": 42}}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ember.backend import ModelState
from ember.errors import public_text


def model_states(
    models: Sequence[str],
    live: Mapping[str, ModelState],
    imports: Mapping[str, ModelState],
    startup_error: BaseException | None,
) -> dict[str, ModelState]:
    """Each of `models`' state: the control plane's (`live`), else its first-run import's,
    else starting; a start-up that failed fails every model not ready."""
    out = {}
    for name in models:
        state = live.get(name) or imports.get(name) or ModelState("starting")
        if startup_error is not None and state.state != "ready":
            state = ModelState("failed", reason=f"the server failed to start: {public_text(startup_error)}")
        out[name] = state
    return out


def health_answer(
    states: Mapping[str, ModelState],
    *,
    attached: bool,
    draining: bool,
    stage: str,
    startup_error: BaseException | None = None,
) -> tuple[int, dict[str, Any]]:
    """/health's status code and body. `attached`: the server serves from its backend
    (every model's start has settled); `stage`: what the start-up is doing."""
    models = {name: s.to_json() for name, s in states.items()}
    if draining:
        return 503, {"status": "stopping", "message": "the server is stopping", "models": models}
    if startup_error is not None:
        message = f"the server failed to start: {public_text(startup_error)}"
        return 503, {"status": "failed", "message": message, "models": models}
    waiting = [(name, s) for name, s in states.items() if s.state != "ready"]
    failed = [(name, s) for name, s in waiting if s.state == "failed"]
    if failed:
        name, state = failed[0]
        message = f"model {name!r} failed: {state.reason}"
        return 503, {"status": "failed", "message": message, "models": models}
    if attached and not waiting:
        return 200, {"status": "ok", "models": models}
    message = stage  # what the start-up is doing: importing, loading the models
    if waiting and waiting[0][1].state == "starting" and not any(s.state == "importing" for _, s in waiting):
        name, state = waiting[0]
        message = f"model {name!r} is starting" + (f" ({state.reason})" if state.reason else "")
    return 503, {"status": "starting", "message": message, "models": models}
