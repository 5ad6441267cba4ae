"""What the HTTP layer needs from whatever runs the models.

`ModelBackend` is the seam: the embedded backend here runs one AsyncEngine per
model in this process; the serverless control plane puts deployments, placement
and routing behind the same interface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ember.engine.async_engine import AsyncEngine
from ember.engine.request import EngineRequest, EngineStats, RequestOutput
from ember.errors import ModelNotFoundError


@dataclass(frozen=True)
class ModelInfo:
    """What the API layer needs to prepare a request for one model."""

    name: str
    tokenizer: Any  # a Hugging Face tokenizer (encode, decode, apply_chat_template)
    max_model_len: int
    created: int  # unix seconds, for /v1/models


class ModelBackend(Protocol):
    def models(self) -> list[ModelInfo]: ...

    def model(self, name: str) -> ModelInfo: ...

    def generate(self, model: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas; closing the iterator early aborts the request
        and frees its KV blocks."""
        ...

    def gauges(self) -> Mapping[str, EngineStats]: ...

    async def close(self) -> None: ...


class EmbeddedBackend:
    """Every model in this process, one AsyncEngine each."""

    def __init__(self, engines: Mapping[str, AsyncEngine], created: int) -> None:
        self._engines = dict(engines)
        self._info = {
            name: ModelInfo(name, e.engine.tokenizer, e.engine.max_model_len, created)
            for name, e in self._engines.items()
        }

    def models(self) -> list[ModelInfo]:
        return list(self._info.values())

    def model(self, name: str) -> ModelInfo:
        try:
            return self._info[name]
        except KeyError:
            raise ModelNotFoundError(f"the model '{name}' does not exist", param="model") from None

    async def generate(self, model: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        engine = self._engine(model)
        async for delta in engine.generate(request):
            yield delta

    def _engine(self, name: str) -> AsyncEngine:
        self.model(name)
        return self._engines[name]

    def gauges(self) -> dict[str, EngineStats]:
        return {name: e.engine.stats() for name, e in self._engines.items()}

    async def close(self) -> None:
        for e in self._engines.values():
            e.shutdown()
