"""EmbeddedBackend: a ModelBackend over engines in this process, one per model, with
no control plane; the server tests' backend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

from ember.backend import ModelInfo
from ember.engine.async_engine import AsyncEngine
from ember.engine.request import EngineRequest, EngineStats, RequestOutput
from ember.errors import ModelNotFoundError


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
        self.model(model)
        async for delta in self._engines[model].generate(request):
            yield delta

    def gauges(self) -> dict[str, EngineStats]:
        return {name: e.engine.stats() for name, e in self._engines.items()}

    async def close(self) -> None:
        for e in self._engines.values():
            e.shutdown()
