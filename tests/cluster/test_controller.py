"""The control plane on embedded nodes running tiny random Llamas: scaling from and
to zero, cold starts shared by concurrent requests, deletion while serving, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

from ember.cluster.controller import Controller
from ember.cluster.events import NoEvents
from ember.cluster.node import EmbeddedNode
from ember.cluster.state import ClusterState, Deployment
from ember.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    EmberError,
    ModelNotFoundError,
    OverloadedError,
)
from tests.cluster.conftest import collect, make_controller, make_nodes, request, run
from tests.cluster.fakes import FakeClock, FlakyNode

pytestmark = pytest.mark.timeout(120)


def test_scales_from_zero_and_back_to_zero_then_restarts_from_dram(
    ember_home: Path, models: list[str]
) -> None:
    clock = FakeClock()

    async def main() -> None:
        c = make_controller(ember_home, clock=clock)
        await c.start()
        await c.deploy(Deployment("tiny", "tiny", min_instances=0, keep_alive_s=30))
        status = await c.status()
        assert status["deployments"][0]["instances"] == []
        assert [m.name for m in c.models()] == ["tiny"]  # listed while scaled to zero
        assert len(await collect(c, "tiny", request("r1"))) == 8
        [inst] = (await c.status())["deployments"][0]["instances"]
        assert (inst["node"], inst["state"], inst["in_flight"]) == ("node0", "ready", 0)
        clock.advance(29)
        c.reconcile()
        await c.settle()
        assert len((await c.status())["deployments"][0]["instances"]) == 1  # still within keep-alive
        clock.advance(2)
        c.reconcile()
        await c.settle()
        [runtime] = c.nodes.values()  # the disk copy written behind the registry download
        assert await asyncio.to_thread(runtime.store.settle, "tiny") is None  # type: ignore[attr-defined]
        status = await c.status()
        assert status["deployments"][0]["instances"] == []
        [node] = status["nodes"]
        assert node["free_slots"] == 1 and "tiny" in node["dram"] and node["disk"] == ["tiny"]
        # The next cold start finds the weights in the node's DRAM: no I/O.
        assert len(await collect(c, "tiny", request("r2"))) == 8
        await c.settle()  # a streamed start records its load once the weights are all in
        tiers = [load.tier for load in c.state.loads()]
        assert tiers == ["registry", "dram"]
        assert all(load.estimated_s > 0 and load.actual_s > 0 for load in c.state.loads())
        await c.close()

    run(main)


def test_two_requests_for_one_cold_model_start_one_instance(ember_home: Path, models: list[str]) -> None:
    async def main() -> None:
        c = make_controller(ember_home, nodes=2)
        await c.start()
        await c.deploy(Deployment("tiny", "tiny", min_instances=0))
        a, b = await asyncio.gather(collect(c, "tiny", request("a")), collect(c, "tiny", request("b")))
        assert a == b and len(a) == 8
        assert len(c.state.instances(live_only=False)) == 1
        await c.close()

    run(main)


def test_a_deleted_deployment_finishes_its_requests_then_releases_its_instances(
    ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        c = make_controller(ember_home)
        await c.start([Deployment("tiny", "tiny", min_instances=1)])
        await c.wait_ready(30)
        stream = c.generate("tiny", request("long", max_tokens=48))
        first = await anext(stream)
        await c.delete("tiny")
        with pytest.raises(ModelNotFoundError):
            await collect(c, "tiny", request("late"))
        assert c.models() == []
        tokens = list(first.outputs[0].token_ids)
        async for delta in stream:
            tokens += delta.outputs[0].token_ids
            last = delta
        assert len(tokens) == 48 and last.outputs[0].finish_reason == "length"
        await c.settle()
        status = await c.status()
        assert status["deployments"] == [] and status["nodes"][0]["free_slots"] == 1
        assert c.state.instances() == []
        await c.close()

    run(main)


def test_a_restarted_controller_keeps_deployments_and_forgets_dead_instances(
    ember_home: Path, models: list[str]
) -> None:
    async def first_life() -> str:
        c = make_controller(ember_home, nodes=2)
        await c.start([Deployment("tiny", "tiny", min_instances=1), Deployment("cold", "tiny2")])
        await c.wait_ready(30)
        [inst] = (await c.status())["deployments"][0]["instances"]
        for node in c.nodes.values():  # the process dies: its engines go, its records stay "ready"
            await node.close()
        return str(inst["id"])

    old_id = run(first_life)
    assert [i.id for i in ClusterState(ember_home / "old-view.db").instances()] == []

    async def second_life() -> None:
        c = make_controller(ember_home, nodes=2)
        assert old_id not in {i.id for i in c.state.instances()}  # marked dead on open
        await c.start()
        await c.wait_ready(30)
        status = await c.status()
        assert [(d["name"], d["min_instances"]) for d in status["deployments"]] == [("tiny", 1), ("cold", 0)]
        [inst] = status["deployments"][0]["instances"]
        assert inst["id"] != old_id and inst["state"] == "ready"
        assert status["deployments"][1]["instances"] == []
        assert len(await collect(c, "cold", request("x"))) == 8
        await c.close()

    run(second_life)


def test_placement_prefers_the_node_holding_the_model_in_dram(ember_home: Path, models: list[str]) -> None:
    clock = FakeClock()

    async def main() -> None:
        c = make_controller(ember_home, nodes=2, clock=clock)
        await c.start()
        await c.deploy(Deployment("tiny", "tiny", keep_alive_s=1))
        await collect(c, "tiny", request("warm"))
        [inst] = (await c.status())["deployments"][0]["instances"]
        clock.advance(2)
        c.reconcile()
        await c.settle()
        for i in range(3):  # every cold start goes back to the node holding it in DRAM
            await collect(c, "tiny", request(f"r{i}"))
            [again] = (await c.status())["deployments"][0]["instances"]
            assert again["node"] == inst["node"]
            clock.advance(2)
            c.reconcile()
            await c.settle()
        assert [load.tier for load in c.state.loads()] == ["registry", "dram", "dram", "dram"]
        await c.close()

    run(main)


def test_a_request_that_finds_every_slot_taken_gets_overloaded(ember_home: Path, models: list[str]) -> None:
    async def main() -> None:
        c = make_controller(ember_home, start_timeout_s=0.5)
        await c.start([Deployment("tiny", "tiny", min_instances=1), Deployment("other", "tiny2")])
        await c.wait_ready(30)
        with pytest.raises(OverloadedError) as exc:
            await collect(c, "other", request("x"))
        assert exc.value.status == 503 and exc.value.retry_after_s > 0
        await c.close()

    run(main)


def test_a_start_whose_weights_fail_their_checksums_is_dropped_and_the_next_refetches(
    ember_home: Path, models: list[str]
) -> None:
    clock = FakeClock()

    async def main() -> None:
        c = make_controller(ember_home, clock=clock)
        await c.start()
        await c.deploy(Deployment("tiny", "tiny", min_instances=0, keep_alive_s=1))
        want = await collect(c, "tiny", request("warm"))
        clock.advance(2)
        c.reconcile()
        await c.settle()
        [node] = c.instances.nodes.values()
        store = node.store  # type: ignore[attr-defined]
        assert await asyncio.to_thread(store.settle, "tiny") is None  # the disk copy, written behind
        assert store.evict("tiny")
        part = store.disk.path("tiny") / "part-00000.bin"
        part.write_bytes(part.read_bytes()[:-64] + bytes(64))  # the disk copy's tail goes bad
        with pytest.raises(EmberError):
            await collect(c, "tiny", request("bad"))
        await c.settle()
        assert (await c.status())["deployments"][0]["instances"] == []
        assert (await c.status())["nodes"][0]["free_slots"] == 1
        clock.advance(1)  # the next start waits out the first failure's backoff
        assert await collect(c, "tiny", request("again")) == want  # fetched afresh from the registry
        await c.settle()  # its load is recorded once its weights are all in, maybe after the request
        assert [load.tier for load in c.state.loads()] == ["registry", "registry"]
        await c.close()

    run(main)


def stall(node: EmbeddedNode, instance_id: str, after_steps: int) -> threading.Event:
    """Hold the instance's engine before its iteration `after_steps` + 1 until the
    returned gate opens: its requests stay running however slow the machine."""
    engine = node.engine(instance_id).engine
    step, left, gate = engine.step, [after_steps], threading.Event()

    def held() -> Any:
        if left[0] == 0:
            gate.wait(60)
        left[0] -= 1
        return step()

    engine.step = held  # type: ignore[method-assign]
    return gate


def test_gauges_are_the_engine_stats_of_any_node_runtime(ember_home: Path, models: list[str]) -> None:
    """The node is a NodeRuntime wrapper (as a Ray node's client is), not an
    EmbeddedNode: its engine's figures still reach the gauges, and a node that does
    not answer leaves the router's count instead of an error."""
    [inner] = make_nodes(ember_home)
    node = FlakyNode(inner)

    async def main() -> None:
        c = make_controller(ember_home, runtimes=[node])
        await c.start([Deployment("tiny", "tiny", min_instances=1)])
        await c.wait_ready(30)
        [inst] = (await c.status())["deployments"][0]["instances"]
        gate = stall(inner, inst["id"], after_steps=2)
        try:
            async with contextlib.aclosing(c.generate("tiny", request("long", max_tokens=48))) as stream:
                await anext(stream)  # prefilled, then held mid-stream
                gauges = (await c.collect_gauges())["tiny"]
                assert (gauges.num_running, gauges.num_waiting) == (1, 0) and gauges.kv_cache_usage > 0
                assert c.gauges() == {"tiny": gauges}  # kept for /metrics, which cannot wait
                node.broken.add("engine_stats")
                silent = (await c.collect_gauges())["tiny"]
                assert (silent.num_running, silent.kv_cache_usage) == (1, 0.0)  # in flight per the router
                node.broken.clear()
                gate.set()
                assert len([d async for d in stream]) > 0
        finally:
            gate.set()
        idle = (await c.collect_gauges())["tiny"]
        assert (idle.num_running, idle.num_waiting, idle.kv_cache_usage) == (0, 0, 0.0)
        await c.close()

    run(main)


def test_deploying_a_model_missing_from_the_store_says_so(ember_home: Path, models: list[str]) -> None:
    # No --registry: the nodes fetch from the store itself, and the error says the store.
    async def main() -> None:
        c = make_controller(ember_home)
        await c.start()
        with pytest.raises(CheckpointNotFoundError) as info:
            await c.deploy(Deployment("ghost", "ghost"))
        assert info.value.public == "checkpoint 'ghost' is not in the store (see `ember store ls`)"
        assert str(ember_home / "store" / "ghost") in str(info.value)  # the log's detail
        await c.close()

    run(main)


def test_a_burst_on_a_full_node_waits_as_requests_not_instances_and_is_served_once_the_slot_frees(
    ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        c = make_controller(ember_home)  # one node with one slot
        await c.start([Deployment("other", "tiny2", min_instances=1)])
        await c.wait_ready(30)
        await c.deploy(Deployment("tiny", "tiny", max_instances=4, target_concurrency=4))
        burst = [asyncio.create_task(collect(c, "tiny", request(f"r{i}"))) for i in range(50)]

        async def deployments() -> dict[str, Any]:
            return {d["name"]: d for d in (await c.status())["deployments"]}

        while (await deployments())["tiny"]["waiting_requests"] < 50:
            pass  # each status() awaits the node: the burst's tasks run meanwhile
        status = await deployments()
        assert status["tiny"]["instances"] == []  # demand for 4, no slot: no instance at all
        assert [(i["node"], i["state"]) for i in status["other"]["instances"]] == [("node0", "ready")]

        await c.delete("other")  # its instance goes and frees the slot
        while not (instances := (await deployments())["tiny"]["instances"]):
            pass
        assert [i["node"] for i in instances] == ["node0"]  # the one slot, never a placeholder
        assert all(len(tokens) == 8 for tokens in await asyncio.gather(*burst))
        await c.settle()  # the starts still waiting for a slot give up once demand goes
        [tiny] = (await c.status())["deployments"]
        assert tiny["waiting_requests"] == 0
        assert [(i["node"], i["state"]) for i in tiny["instances"]] == [("node0", "ready")]
        assert len(c.state.instances(live_only=False)) == 2  # other's and tiny's, nothing else
        await c.close()

    run(main)


class CountedReclaims(NoEvents):
    def __init__(self) -> None:
        self.stopped_early: list[str] = []

    def reclaimed(self, deployment: str) -> None:
        self.stopped_early.append(deployment)


def test_a_start_stops_an_idle_instance_instead_of_waiting_out_its_keep_alive(
    ember_home: Path, models: list[str]
) -> None:
    events = CountedReclaims()

    async def main() -> None:
        c = make_controller(ember_home, events=events)  # one node, one slot; the clock stands still
        await c.start()
        await c.deploy(Deployment("a", "tiny", min_instances=0, keep_alive_s=600))
        await c.deploy(Deployment("b", "tiny2", min_instances=0, keep_alive_s=600))
        want = await collect(c, "a", request("a1"))
        assert await collect(c, "b", request("b1")) == want  # a's idle instance gave b its slot
        assert await collect(c, "a", request("a2")) == want  # and b's gives it back
        assert events.stopped_early == ["a", "b"]
        await c.settle()  # a2's load is recorded once its weights are all in
        # a's weights stayed in the node's DRAM pool while b ran: its restart reads no file.
        assert [(load.model, load.tier) for load in c.state.loads()] == [
            ("tiny", "registry"), ("tiny2", "registry"), ("tiny", "dram"),
        ]  # fmt: skip
        status = {d["name"]: d for d in (await c.status())["deployments"]}
        assert [i["state"] for i in status["a"]["instances"]] == ["ready"] and status["b"]["instances"] == []
        await c.close()

    run(main)


async def _streaming_until_told(home: Path) -> tuple[Controller, FlakyNode, EmbeddedNode]:
    """A started controller over one node of one slot whose every load stays "still
    streaming" (instance_loaded waits) until node.loaded_gate is set; the clock stands still."""
    [inner] = make_nodes(home)
    node = FlakyNode(inner)
    node.loaded_gate = asyncio.Event()
    c = make_controller(home, runtimes=[node])
    await c.start()
    return c, node, inner


def test_an_instance_stopped_while_its_weights_stream_is_not_a_failed_start(
    ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        c, node, _ = await _streaming_until_told(ember_home)
        await c.deploy(Deployment("a", "tiny", min_instances=0, keep_alive_s=600))
        await c.deploy(Deployment("b", "tiny2", min_instances=0, keep_alive_s=600))
        want = await collect(c, "a", request("a1"))  # served while its weights arrive
        assert await collect(c, "b", request("b1")) == want  # its idle, loading instance gave b the slot
        node.loaded_gate.set()
        await c.settle()
        assert c.model_states()["a"].state == "ready" and c.instances.failures == {}  # no backoff
        assert await collect(c, "a", request("a2")) == want
        await c.close()

    run(main)


def test_the_requests_of_a_start_that_fails_while_it_streams_get_the_start_s_error(
    ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        c, node, inner = await _streaming_until_told(ember_home)
        node.loaded_errors = [CorruptCheckpointError("checksum mismatch in part-00000.bin")]
        gates: list[threading.Event] = []
        node.started = lambda instance_id: gates.append(stall(inner, instance_id, after_steps=1))
        await c.deploy(Deployment("tiny", "tiny", min_instances=0))
        stream = c.generate("tiny", request("r"))
        await anext(stream)  # its first token, from an instance still loading; then held
        node.loaded_gate.set()  # the load fails: the instance is discarded under its request
        gates[0].set()
        await c.settle()
        with pytest.raises(EmberError, match="checksum mismatch"):  # not "the engine was shut down"
            async for _ in stream:
                pass
        assert (await c.status())["nodes"][0]["free_slots"] == 1
        await c.close()

    run(main)


def test_concurrent_starts_on_one_idle_slot_are_each_served_in_turn(
    ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        c = make_controller(ember_home)  # one node, one slot
        await c.start()
        for name, model in (("idle", "tiny"), ("x", "tiny2"), ("y", "tiny")):
            await c.deploy(Deployment(name, model, min_instances=0, keep_alive_s=600))
        want = await collect(c, "idle", request("first"))
        x, y = await asyncio.gather(collect(c, "x", request("x")), collect(c, "y", request("y")))
        assert x == y == want
        await c.settle()
        live = [i for d in (await c.status())["deployments"] for i in d["instances"]]
        assert len(live) == 1 and (await c.status())["nodes"][0]["free_slots"] == 0
        await c.close()

    run(main)
