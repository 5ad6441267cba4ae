"""Node failure: a node that dies mid-stream (NodeFailedError, as a dead Ray actor
raises) or stops answering its health check is marked down; its requests finish on
another node with the tokens they would have had; with no node left, the client gets
a clear NodeFailedError and nothing hangs."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from ember.cluster.controller import Controller
from ember.cluster.state import Deployment
from ember.engine.request import EngineRequest, SamplingParams
from ember.errors import NodeFailedError
from tests.cluster.conftest import make_controller, make_nodes, run
from tests.cluster.fakes import FlakyNode

pytestmark = pytest.mark.timeout(120)

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=0.9, seed=77, ignore_eos=True)
UNSEEDED = SamplingParams(max_tokens=40, temperature=0.9, ignore_eos=True)  # seed drawn at admission


async def tokens_of(c: Controller, req: EngineRequest, model: str = "tiny") -> list[int]:
    out: list[int] = []
    async for delta in c.generate(model, req):
        out += delta.outputs[0].token_ids
    return out


async def _serving_node(c: Controller, flaky: list[FlakyNode], model: str = "tiny") -> FlakyNode:
    status = await c.status()
    [inst] = next(d for d in status["deployments"] if d["name"] == model)["instances"]
    return next(f for f in flaky if f.node_id == inst["node"])


@pytest.mark.parametrize("params", [GREEDY, SEEDED, UNSEEDED], ids=["greedy", "seeded", "unseeded"])
def test_a_node_dying_mid_stream_hands_its_requests_to_another_node_exactly(
    ember_home: Path, models: list[str], params: SamplingParams
) -> None:
    flaky = [FlakyNode(n) for n in make_nodes(ember_home, 2)]

    async def main() -> None:
        c = make_controller(ember_home, runtimes=flaky)
        await c.start([Deployment("tiny", "tiny", min_instances=1, target_concurrency=8)])
        await c.wait_ready(30)
        reqs = [EngineRequest.make(f"r{i}", p, params) for i, p in enumerate([[1, 17, 42, 99], [5, 6, 7]])]
        expected = [await tokens_of(c, r) for r in reqs]
        dying = await _serving_node(c, flaky)
        dying.die_after_tokens = dying.streamed + 7  # both requests are in flight when it dies
        # the same requests again (an unseeded one keeps the seed it drew at admission)
        again = [dataclasses.replace(r, request_id=f"again{r.request_id}") for r in reqs]
        got = await asyncio.gather(*(tokens_of(c, r) for r in again))
        assert list(got) == expected
        status = await c.status()
        assert [n["id"] for n in status["nodes"]] == [f.node_id for f in flaky if f is not dying]
        [inst] = status["deployments"][0]["instances"]
        assert inst["node"] != dying.node_id
        dead = [i for i in c.state.instances(live_only=False) if i.node == dying.node_id]
        assert dead and all(i.state == "dead" for i in dead)
        await c.close()

    run(main)


def test_with_no_node_left_the_client_gets_a_node_failure_and_nothing_hangs(
    ember_home: Path, models: list[str]
) -> None:
    [flaky] = [FlakyNode(n) for n in make_nodes(ember_home, 1)]

    async def main() -> None:
        c = make_controller(ember_home, runtimes=[flaky])
        await c.start([Deployment("tiny", "tiny", min_instances=1)])
        await c.wait_ready(30)
        flaky.die_after_tokens = flaky.streamed + 5
        got: list[int] = []
        with pytest.raises(NodeFailedError) as exc:
            async for delta in c.generate("tiny", EngineRequest.make("x", [1, 2, 3], GREEDY)):
                got += delta.outputs[0].token_ids
        assert len(got) == 5
        assert exc.value.status == 503 and "node0" in str(exc.value)
        with pytest.raises(NodeFailedError):  # later requests too, at once
            await tokens_of(c, EngineRequest.make("y", [1, 2, 3], GREEDY))
        await c.close()

    run(main)


def test_a_full_cluster_cannot_take_a_failed_request_within_the_start_timeout(
    ember_home: Path, models: list[str]
) -> None:
    flaky = [FlakyNode(n) for n in make_nodes(ember_home, 2)]

    async def main() -> None:
        c = make_controller(ember_home, runtimes=flaky, start_timeout_s=1.0)
        await c.start(
            [Deployment("tiny", "tiny", min_instances=1), Deployment("busy", "tiny2", min_instances=1)]
        )
        await c.wait_ready(30)
        dying = await _serving_node(c, flaky)
        dying.die_after_tokens = dying.streamed + 3
        with pytest.raises(NodeFailedError, match="no other instance"):
            await tokens_of(c, EngineRequest.make("x", [1, 2, 3], GREEDY))
        await c.close()

    run(main)


def test_a_node_whose_status_hangs_is_marked_down_by_the_health_check(
    ember_home: Path, models: list[str]
) -> None:
    flaky = [FlakyNode(n) for n in make_nodes(ember_home, 2)]

    async def main() -> None:
        c = make_controller(ember_home, runtimes=flaky, health_timeout_s=0.2)
        await c.start([Deployment("tiny", "tiny", min_instances=1)])
        await c.wait_ready(30)
        hung = await _serving_node(c, flaky)
        hung.hang_status = True
        statuses = await c.instances.statuses()  # what every tick runs
        assert [s.node_id for s in statuses] == [f.node_id for f in flaky if f is not hung]
        assert c.router.on_node(hung.node_id) == []
        assert len(await tokens_of(c, EngineRequest.make("x", [1, 2, 3], GREEDY))) == 40
        assert (await _serving_node(c, flaky)) is not hung
        await c.close()

    run(main)
