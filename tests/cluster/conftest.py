"""Clusters of embedded nodes over tiny random Llamas imported into the store as
`tiny` and `tiny2` (two models, one set of weights), with an injectable clock."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ember.cluster.controller import Controller, ControllerConfig
from ember.cluster.estimator import StartupTimeEstimator
from ember.cluster.events import ClusterEvents
from ember.cluster.node import EmbeddedNode
from ember.cluster.placement import PlacementPolicy
from ember.cluster.runtime import NodeRuntime
from ember.cluster.state import ClusterState
from ember.engine.request import EngineRequest, SamplingParams
from ember.store.local import LocalStore
from ember.store.registry import DirectoryRegistry
from tests.cluster.fakes import FakeClock

ENGINE = {"max_model_len": 256, "kv_cache_bytes": 8 << 20, "max_num_seqs": 8, "swap": "off"}
T = TypeVar("T")


@pytest.fixture
def models(tiny_llama: tuple[Path, Any], ember_home: Path) -> list[str]:
    """`tiny` and `tiny2` in this test's store (hard links: no copy of the weights)."""
    store = LocalStore(ember_home)
    for name in ("tiny", "tiny2"):
        shutil.copytree(tiny_llama[0], store.path_for(name), copy_function=os.link)
        store.register(name)
    return ["tiny", "tiny2"]


def make_nodes(home: Path, nodes: int = 1, slots: int = 1) -> list[EmbeddedNode]:
    registry = DirectoryRegistry(home / "store")
    return [
        EmbeddedNode(f"node{i}", registry, slots=slots, home=home, engine_options=ENGINE, probe_bytes=1 << 20)
        for i in range(nodes)
    ]


def make_controller(
    home: Path,
    *,
    nodes: int = 1,
    slots: int = 1,
    clock: Callable[[], float] | None = None,
    start_timeout_s: float = 60.0,
    policy: str | PlacementPolicy = "startup-time-aware",
    runtimes: Sequence[NodeRuntime] | None = None,
    estimator: StartupTimeEstimator | None = None,
    events: ClusterEvents | None = None,
    **config: Any,
) -> Controller:
    """A controller over `nodes` embedded nodes (or the given runtimes), ticking only
    when a test calls reconcile()."""
    return Controller(
        runtimes if runtimes is not None else make_nodes(home, nodes, slots),
        state=ClusterState(home / "cluster.db"),
        policy=policy,
        estimator=estimator,
        events=events,
        config=ControllerConfig(start_timeout_s=start_timeout_s, tick_s=None, **config),
        clock=clock or FakeClock(),
    )


def request(rid: str, max_tokens: int = 8) -> EngineRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest.make(rid, [1, 17, 42, 99], params)


async def collect(controller: Controller, model: str, req: EngineRequest) -> list[int]:
    tokens: list[int] = []
    async for delta in controller.generate(model, req):
        tokens += delta.outputs[0].token_ids
    return tokens


def run(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(asyncio.wait_for(work(), 60))
