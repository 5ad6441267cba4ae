"""The seam between the HTTP server and whatever runs the models.

`ModelBackend` is what `ember.server` serves from and `ModelInfo` what it needs to
prepare a request for one model. The control plane (`ember.cluster.controller`, and
`RayBackend` over its Ray actor) implements it. This module sits below both
packages, above the engine whose messages it carries, so neither imports the other
for it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ember.engine.request import EngineRequest, EngineStats, RequestOutput


@dataclass(frozen=True)
class ModelInfo:
    """What the API layer needs to prepare a request for one model."""

    name: str
    tokenizer: Any  # a Hugging Face tokenizer (encode, decode, apply_chat_template)
    max_model_len: int
    created: int  # unix seconds, for /v1/models


# A served model's state: "importing" (the first run's import into the store),
# "starting" (no instance ready yet, or retrying a failed start), "ready" (it can
# serve), "failed" (it cannot start, for a reason no retry can fix).
ModelStateName = Literal["starting", "importing", "ready", "failed"]


@dataclass(frozen=True)
class ModelState:
    """Whether one model can serve, for /health and `ember status`."""

    state: ModelStateName
    reason: str | None = None  # failed: why; starting: why the last start failed, if one did
    progress: int | None = None  # importing: percent done (None until the sizes are known)
    retry_in_s: float | None = None  # starting after a failed start: seconds to the next try

    def to_json(self) -> dict[str, Any]:
        """The fields that are set, as /health and `ember status --json` show them."""
        out: dict[str, Any] = {"state": self.state}
        for key in ("reason", "progress", "retry_in_s"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ModelBackend(Protocol):
    def models(self) -> list[ModelInfo]: ...

    def model(self, name: str) -> ModelInfo:
        """The model's info; ModelNotFoundError if it is not served."""
        ...

    def generate(self, model: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas; closing the iterator early aborts the request
        and frees its KV blocks."""
        ...

    def gauges(self) -> Mapping[str, EngineStats]:
        """Engine figures per model (summed over its instances) for /metrics; may lag
        the engines by a refresh period."""
        ...

    async def close(self) -> None: ...
