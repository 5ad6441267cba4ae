"""An instance whose engine thread dies (an error the engine could not contain): the
controller stops that instance, not its node, and the requests it served continue on
another instance with the tokens they would have had; with no instance to take them,
they end with a clear 503. An idle one is found by the controller's gauge collection."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from ember.cluster.controller import Controller
from ember.cluster.node import EmbeddedNode
from ember.cluster.state import Deployment
from ember.engine.async_engine import AsyncEngine
from ember.engine.request import EngineRequest, SamplingParams
from ember.errors import InstanceFailedError, NodeFailedError, OverloadedError
from tests.cluster.conftest import make_controller, make_nodes, run

pytestmark = pytest.mark.timeout(120)

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def kill_after(engine: AsyncEngine, steps: int) -> None:
    """The engine's thread dies at its step after `steps`: the step itself raises, an
    error no iteration contains."""
    step = engine.engine.step
    calls = [0]

    def dying() -> Any:
        calls[0] += 1
        if calls[0] > steps:
            raise RuntimeError("corrupt engine state")
        return step()

    engine.engine.step = dying  # type: ignore[method-assign]


async def tokens_of(c: Controller, req: EngineRequest) -> list[int]:
    out: list[int] = []
    async for delta in c.generate("tiny", req):
        out += delta.outputs[0].token_ids
    return out


def serving(c: Controller, nodes: list[EmbeddedNode]) -> tuple[str, EmbeddedNode]:
    """The one instance of `tiny`, and its node."""
    [route] = c.router.routes("tiny")
    return route.instance_id, next(n for n in nodes if n.node_id == route.node)


def test_a_dead_engine_thread_stops_its_instance_and_its_streams_continue_elsewhere(
    ember_home: Path, models: list[str]
) -> None:
    nodes = make_nodes(ember_home, 2)

    async def main() -> None:
        c = make_controller(ember_home, runtimes=nodes)
        await c.start([Deployment("tiny", "tiny", min_instances=1, target_concurrency=8)])
        await c.wait_ready(30)
        reqs = [EngineRequest.make(f"r{i}", p, GREEDY) for i, p in enumerate([[1, 17, 42, 99], [5, 6, 7]])]
        expected = [await tokens_of(c, r) for r in reqs]
        dead, node = serving(c, nodes)
        await c.settle()  # its start finished (weights all in): the failure is the engine's alone
        kill_after(node.engine(dead), steps=6)
        again = [dataclasses.replace(r, request_id=f"again-{r.request_id}") for r in reqs]
        assert list(await asyncio.gather(*(tokens_of(c, r) for r in again))) == expected
        await c.settle()
        status = await c.status()
        assert sorted(n["id"] for n in status["nodes"]) == ["node0", "node1"]  # no node went down
        [inst] = status["deployments"][0]["instances"]
        assert inst["id"] != dead and inst["state"] == "ready"
        assert [i.state for i in c.state.instances(live_only=False) if i.id == dead] == ["dead"]
        assert dead not in (await node.status()).instances  # stopped: its slot is free again
        await c.close()

    run(main)


def test_with_no_instance_to_take_them_the_streams_of_a_dead_engine_get_a_503(
    ember_home: Path, models: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    [node] = make_nodes(ember_home, 1)

    async def main() -> None:
        c = make_controller(ember_home, runtimes=[node])
        await c.start([Deployment("tiny", "tiny", min_instances=1)])
        await c.wait_ready(30)
        dead, _ = serving(c, [node])
        await c.settle()  # its start finished (weights all in): the failure is the engine's alone

        async def no_start(*args: Any, **kwargs: Any) -> Any:
            raise OverloadedError("no replacement can start", retry_after_s=5.0)

        monkeypatch.setattr(node, "start_instance", no_start)
        kill_after(node.engine(dead), steps=3)
        got: list[int] = []
        with pytest.raises(NodeFailedError, match="no other instance") as exc:
            async for delta in c.generate("tiny", EngineRequest.make("x", [1, 2, 3], GREEDY)):
                got += delta.outputs[0].token_ids
        assert exc.value.status == 503 and "corrupt engine state" in str(exc.value)
        assert len(got) == 3  # what it had before its engine died
        await c.settle()
        status = await node.status()
        assert status.instances == () and status.free_slots == 1
        assert [n["id"] for n in (await c.status())["nodes"]] == ["node0"]  # the node lives on
        await c.close()

    run(main)


def test_an_idle_instance_whose_engine_died_is_stopped_by_the_gauge_collection(
    ember_home: Path, models: list[str]
) -> None:
    [node] = make_nodes(ember_home, 1)

    async def main() -> None:
        c = make_controller(ember_home, runtimes=[node])
        await c.start([Deployment("tiny", "tiny", min_instances=1)])
        await c.wait_ready(30)
        dead, _ = serving(c, [node])
        await node.instance_loaded(dead)  # idle: its weights all in, its start finished
        await c.settle()
        kill_after(node.engine(dead), steps=0)
        with pytest.raises(InstanceFailedError):  # straight to the node, past the controller
            async for _ in node.generate(dead, EngineRequest.make("x", [1, 2, 3], GREEDY)):
                pass
        with pytest.raises(InstanceFailedError):
            await node.engine_stats(dead)
        await c.collect_gauges()
        await c.settle()
        assert dead not in (await node.status()).instances
        assert len(await tokens_of(c, EngineRequest.make("y", [1, 2, 3], GREEDY))) == 24  # a new instance
        await c.close()

    run(main)
