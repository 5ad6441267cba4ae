"""An engine over weights still arriving: each forward waits for a layer's weights
just before it runs that layer, gives the tokens of an engine over loaded weights,
and teaches the iteration-time profile nothing while it waits."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest
import torch

from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.engine.loader import load_engine
from ember.engine.request import EngineRequest, SamplingParams
from ember.store import load_tensors
from ember.store.loader import LoadProgress, stream_tensors

pytestmark = pytest.mark.timeout(60)
CONFIG = EngineConfig(max_model_len=128, kv_cache_bytes=4 << 20, scheduler="fcfs", swap="off")
PROMPT = [1, 17, 42, 99, 7]


class RecordingLoad:
    """Stands in for a LoadProgress: records which tensors each wait asked for."""

    def __init__(self) -> None:
        self.complete = False
        self.asked: list[set[int]] = []

    def wait_for(self, tensors: list[torch.Tensor]) -> None:
        self.asked.append({t.data_ptr() for t in tensors})

    def wait(self, timeout: float | None = None) -> None:
        self.complete = True


def _greedy(engine: Engine, rid: str, n: int = 12) -> list[int]:
    engine.add_request(EngineRequest.make(rid, PROMPT, SamplingParams(max_tokens=n, temperature=0.0)))
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.outputs[0].token_ids)
    return tokens


def test_streamed_weights_give_the_same_tokens(tiny_llama: tuple[Path, Any]) -> None:
    path = tiny_llama[0]
    plain = load_engine(path, CONFIG, weights=load_tensors(path))
    tensors, progress = stream_tensors(path)
    streamed = load_engine(path, CONFIG, weights=tensors, loading=progress)
    assert _greedy(streamed, "a") == _greedy(plain, "a")
    assert streamed.runner.model.loading is None  # dropped once every byte was in


def test_forward_waits_layer_by_layer_in_order(tiny_llama: tuple[Path, Any]) -> None:
    path = tiny_llama[0]
    weights = load_tensors(path)
    load = RecordingLoad()
    engine = load_engine(path, CONFIG, weights=weights, loading=cast(LoadProgress, load))
    observed = engine.profile._count
    _greedy(engine, "a", n=2)
    model = engine.runner.model
    ptr = {name: t.data_ptr() for name, t in weights.items()}
    layers = [{p.data_ptr() for p in layer.parameters()} for layer in model.layers]
    step = [{ptr["model.embed_tokens.weight"]}, *layers, {ptr["model.norm.weight"]}, {ptr["lm_head.weight"]}]
    assert load.asked[: len(step)] == step  # the first forward: embeddings, layer 0, 1, ..., head
    assert load.asked[len(step) : 2 * len(step)] == step  # and the next, while still loading
    assert engine.profile._count == observed  # iterations that waited on weights are no samples

    load.complete = True
    asked = len(load.asked)
    assert _greedy(engine, "b", n=2)
    assert model.loading is None and len(load.asked) == asked
    assert engine.profile._count > observed


def test_a_dtype_conversion_waits_for_the_whole_load(tiny_llama: tuple[Path, Any]) -> None:
    path = tiny_llama[0]
    load = RecordingLoad()
    config = EngineConfig(max_model_len=128, kv_cache_bytes=4 << 20, dtype="float32")
    engine = load_engine(path, config, weights=load_tensors(path), loading=cast(LoadProgress, load))
    assert load.complete and engine.runner.model.loading is None and load.asked == []
