"""Live migration on embedded nodes running tiny random Llamas: chosen by placement
when it is the fastest way to start a model, and invisible in the moved streams
(the tokens of an unmigrated run, greedy, seeded or unseeded, with several requests
batched);
a destination that fails leaves the requests on their source."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from ember.cluster.controller import Controller
from ember.cluster.estimator import Observation, StartupEstimate, StartupTimeEstimator
from ember.cluster.messages import InstanceInfo, NodeStatus
from ember.cluster.migration import LiveMigration, MigrationConfig
from ember.cluster.migration_cost import MigrationCost
from ember.cluster.node import EmbeddedNode
from ember.cluster.router import Route
from ember.cluster.state import Deployment
from ember.engine.request import EngineRequest, SamplingParams
from ember.errors import NodeFailedError
from tests.cluster.conftest import make_controller, make_nodes, run
from tests.cluster.fakes import FakeClock, FlakyNode

pytestmark = pytest.mark.timeout(120)

GREEDY = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=60, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
UNSEEDED = SamplingParams(max_tokens=60, temperature=0.9, top_p=0.95, ignore_eos=True)  # seed: at admission
PROMPTS = [[1, 17, 42, 99], [5, 6, 7, 8, 9, 10, 11], [300, 301]]


def requests(params: SamplingParams, tag: str) -> list[EngineRequest]:
    return [EngineRequest.make(f"{tag}{i}", p, params) for i, p in enumerate(PROMPTS)]


async def tokens_of(c: Controller, req: EngineRequest, started: asyncio.Event | None = None) -> list[int]:
    out: list[int] = []
    async for delta in c.generate("tiny", req):
        out += delta.outputs[0].token_ids
        if started is not None and len(out) >= 3:
            started.set()
    return out


class SourceGate:
    """Holds an instance's engine once each of `expect` requests has streamed
    `hold_at` tokens (far below max_tokens), so they are all still running when the
    migration hands them over, however slow the machine. While held, the engine thread
    waits for commands (it takes the hand-over's abort) instead of stepping; release()
    lets it finish what stayed on it."""

    def __init__(self, node: EmbeddedNode, instance_id: str, expect: int, hold_at: int = 10) -> None:
        self.async_engine = node.engine(instance_id)
        self.expect, self.hold_at = expect, hold_at
        self.tokens: dict[str, int] = {}  # request id -> tokens streamed (engine thread only)
        self.released = False
        engine = self.async_engine.engine
        step, unfinished = engine.step, engine.has_unfinished

        def counting_step() -> Any:
            outputs = step()
            for out in outputs:
                seen = self.tokens.get(out.request_id, 0)
                self.tokens[out.request_id] = seen + len(out.outputs[0].token_ids)
            return outputs

        engine.step = counting_step  # type: ignore[method-assign]
        engine.has_unfinished = lambda: unfinished() and not self.held  # type: ignore[method-assign]

    @property
    def held(self) -> bool:
        reached = sum(n >= self.hold_at for n in self.tokens.values())
        return not self.released and reached >= self.expect

    async def release(self) -> None:
        self.released = True
        # The held thread waits for a command: an abort of an id it does not hold wakes it.
        await self.async_engine.abort("wake-the-engine-thread")


class RecordingEvents:
    def __init__(self) -> None:
        self.migrations: list[tuple[str, int, int]] = []

    def instance_started(self, deployment: str, info: InstanceInfo, observed: Observation) -> None:
        pass

    def scaled(self, deployment: str, direction: str) -> None:
        pass

    def migrated(self, deployment: str, moved: int, stayed: int) -> None:
        self.migrations.append((deployment, moved, stayed))

    def failed_over(self, deployment: str) -> None:
        pass

    def reclaimed(self, deployment: str) -> None:
        pass


class RiggedEstimator(StartupTimeEstimator):
    """Measured estimates plus a fixed penalty per (node, checkpoint)."""

    def __init__(self, penalty: dict[tuple[str, str], float]) -> None:
        super().__init__(clock=FakeClock())
        self.penalty = penalty

    def estimate(self, status: NodeStatus, checkpoint: str, nbytes: int) -> StartupEstimate:
        est = super().estimate(status, checkpoint, nbytes)
        extra = self.penalty.get((status.node_id, checkpoint), 0.0)
        return dataclasses.replace(est, load_s=est.load_s + extra)


def test_placement_migrates_a_running_instance_when_that_starts_a_model_fastest(
    ember_home: Path, models: list[str]
) -> None:
    # tiny2 starts slowly on node1 (a long download, say) and fast on node0, where tiny
    # runs; tiny starts fast on node1. Moving tiny beats both starting on node1 and waiting.
    estimator = RiggedEstimator({("node1", "tiny2"): 1000.0, ("node1", "tiny"): 5.0})
    nodes = make_nodes(ember_home, 2)
    events = RecordingEvents()

    async def main() -> None:
        c = make_controller(ember_home, runtimes=nodes, estimator=estimator, events=events)
        await c.start([Deployment("tiny", "tiny", min_instances=1), Deployment("tiny2", "tiny2")])
        await c.wait_ready(30)
        [inst] = (await c.status())["deployments"][0]["instances"]
        assert inst["node"] == "node0"
        req = EngineRequest.make("ref", PROMPTS[0], GREEDY)
        expected = await tokens_of(c, req)
        gate = SourceGate(nodes[0], inst["id"], expect=1)
        started = asyncio.Event()
        moving = asyncio.create_task(tokens_of(c, dataclasses.replace(req, request_id="moved"), started))
        await asyncio.wait_for(started.wait(), 30)
        other = EngineRequest.make("other", [7, 8, 9], dataclasses.replace(GREEDY, max_tokens=5))
        got_other = [t async for d in c.generate("tiny2", other) for t in d.outputs[0].token_ids]
        assert len(got_other) == 5
        await gate.release()  # nothing is left on the source once the request moved
        assert await moving == expected
        await c.settle()
        status = await c.status()
        placed = {d["name"]: [i["node"] for i in d["instances"]] for d in status["deployments"]}
        assert placed == {"tiny": ["node1"], "tiny2": ["node0"]}
        assert events.migrations == [("tiny", 1, 0)]
        assert c.migration_cost.seconds(100) != pytest.approx(0.0)
        assert len(c.migration_cost._samples) >= 1  # calibrated from the measured recomputation
        await c.close()

    run(main)


async def _migrate_while_streaming(
    c: Controller, nodes: list[EmbeddedNode], params: SamplingParams
) -> tuple[list[list[int]], list[list[int]], Any, str]:
    """(tokens of unmigrated runs, tokens of the runs migrated mid-stream, the report,
    the source instance's id)."""
    [inst] = (await c.status())["deployments"][0]["instances"]
    refs = requests(params, "ref")
    expected = [await tokens_of(c, r) for r in refs]
    source = next(n for n in nodes if n.node_id == inst["node"])
    gate = SourceGate(source, inst["id"], expect=len(PROMPTS))
    started = [asyncio.Event() for _ in PROMPTS]
    streams = [
        asyncio.create_task(tokens_of(c, dataclasses.replace(r, request_id=f"run{i}"), e))
        for i, (r, e) in enumerate(zip(refs, started, strict=True))
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
    dest = next(n.node_id for n in nodes if n.node_id != inst["node"])
    report = await c.instances.migrate(inst["id"], dest)
    await gate.release()  # what stayed on the source (a failed destination) finishes there
    return expected, list(await asyncio.gather(*streams)), report, inst["id"]


@pytest.mark.parametrize("params", [GREEDY, SEEDED, UNSEEDED], ids=["greedy", "seeded", "unseeded"])
def test_batched_requests_migrated_mid_stream_give_the_tokens_of_an_unmigrated_run(
    ember_home: Path, models: list[str], params: SamplingParams
) -> None:
    nodes = make_nodes(ember_home, 2)

    async def main() -> None:
        c = make_controller(ember_home, runtimes=nodes)
        await c.start([Deployment("tiny", "tiny", min_instances=1, target_concurrency=8)])
        await c.wait_ready(30)
        expected, got, report, source_id = await _migrate_while_streaming(c, nodes, params)
        assert got == expected
        assert (report.moved, report.stayed) == (3, 0)
        await c.settle()
        [inst] = (await c.status())["deployments"][0]["instances"]
        assert inst["id"] != source_id and inst["state"] == "ready"  # the source is gone
        assert all(n.engine(inst["id"]).engine.num_parked == 0 for n in nodes if n.node_id == inst["node"])
        await c.close()

    run(main)


@pytest.mark.parametrize("broken", ["prewarm", "generate"])
def test_a_destination_failing_mid_migration_leaves_the_requests_on_their_source(
    ember_home: Path, models: list[str], broken: str
) -> None:
    # prewarm: the destination dies during the rounds; generate: at the hand-over, after
    # the source stopped the requests (they resume there from their snapshots).
    nodes = make_nodes(ember_home, 2)
    flaky = [FlakyNode(n) for n in nodes]

    async def main() -> None:
        c = make_controller(ember_home, runtimes=flaky)
        await c.start([Deployment("tiny", "tiny", min_instances=1, target_concurrency=8)])
        await c.wait_ready(30)
        [inst] = (await c.status())["deployments"][0]["instances"]
        dest = next(f for f in flaky if f.node_id != inst["node"])
        dest.broken.add(broken)
        expected, got, report, source_id = await _migrate_while_streaming(c, nodes, GREEDY)
        assert got == expected
        assert report.stayed == 3 and report.moved == 0
        await c.settle()
        status = await c.status()
        [after] = status["deployments"][0]["instances"]
        assert (after["id"], after["state"]) == (source_id, "ready")  # serving, not draining
        assert [n["id"] for n in status["nodes"]] == [inst["node"]]  # the destination is down
        await c.close()

    run(main)


class RoundsRelay:
    """A relay whose source generated `growth[i]` tokens during round i."""

    def __init__(self, growth: list[int]) -> None:
        self.request_id = "r"
        self.active = True
        self.remaining = 1000
        self.num_tokens = 100
        self.growth = growth
        self.handed_over = False

    def park_request(self) -> EngineRequest:
        tokens = self.num_tokens
        self.num_tokens += self.growth.pop(0) if self.growth else 0
        return EngineRequest.make("r", list(range(tokens)), GREEDY)

    async def hand_over(self, source: Any, route: Any, dest: Any, wait_s: float) -> bool:
        self.handed_over = True
        return True


class ParkingNode:
    node_id = "dest"

    def __init__(self, fail: bool = False) -> None:
        self.parked: list[int] = []
        self.aborted: list[str] = []
        self.fail = fail

    async def prewarm(self, instance_id: str, request: EngineRequest) -> int:
        if self.fail:
            raise NodeFailedError("gone", node="dest")
        self.parked.append(len(request.prompt_token_ids))
        return self.parked[-1]

    async def abort(self, instance_id: str, request_id: str) -> None:
        self.aborted.append(request_id)


def _migration(dest: ParkingNode, cost: MigrationCost) -> LiveMigration:
    src, to = Route("src", "tiny", "node0"), Route("dst", "tiny", "dest")
    return LiveMigration(None, src, dest, to, cost, MigrationConfig(max_rounds=4, gap_tokens=2))  # type: ignore[arg-type]


def test_rounds_go_on_until_the_gap_is_small_or_the_round_limit() -> None:
    async def main() -> None:
        cost = MigrationCost()
        closing, dest = RoundsRelay([20, 5, 1]), ParkingNode()
        report = await _migration(dest, cost).move([closing])  # type: ignore[list-item]
        assert dest.parked == [100, 120, 125] and closing.handed_over  # then a gap of 1: hand over
        assert (report.moved, report.stayed) == (1, 0)
        assert len(cost._samples) == 3 and [t for t, _ in cost._samples] == [100, 20, 5]
        steady, dest = RoundsRelay([30] * 10), ParkingNode()
        await _migration(dest, MigrationCost()).move([steady])  # type: ignore[list-item]
        assert len(dest.parked) == 4 and steady.handed_over  # never closes: 4 rounds, then over

    run(main)


def test_a_destination_failing_in_the_rounds_is_reported_and_nothing_is_handed_over() -> None:
    async def main() -> None:
        relay, dest = RoundsRelay([5]), ParkingNode(fail=True)
        report = await _migration(dest, MigrationCost()).move([relay])  # type: ignore[list-item]
        assert (report.moved, report.stayed) == (0, 1) and not report.complete
        assert isinstance(report.dest_error, NodeFailedError) and not relay.handed_over
        assert dest.aborted == ["r"]  # its parked cache is freed (if the node still lives)

    run(main)
