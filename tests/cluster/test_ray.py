"""The control plane on Ray: a three-node `ray.cluster_utils.Cluster` on this machine
(every process on 127.0.0.1, no dashboard, small object stores), node agents pinned
to each node, checkpoints fetched from the test's store over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn

import ember
from ember.cluster.controller import Controller, ControllerConfig
from ember.cluster.ray_cluster import RayCluster, node_name
from ember.cluster.ray_node import RayNode
from ember.cluster.state import ClusterState, Deployment
from ember.engine.request import EngineRequest, SamplingParams
from ember.errors import NodeFailedError, OverloadedError
from ember.server.runner import build_app
from ember.server.settings import ServeSettings
from ember.store.local import LocalStore
from tests.cluster.conftest import ENGINE, make_controller
from tests.cluster.fakes import FakeClock
from tests.conftest import TINY_LLAMA
from tests.server.conftest import _free_socket

pytestmark = [
    pytest.mark.slow,  # a three-node Ray cluster
    pytest.mark.timeout(180),
]
Cluster = Any  # ray.cluster_utils.Cluster, imported in the fixture
T = TypeVar("T")
NODE = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": 80 << 20}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Head and two workers. Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (every
    address on the loopback) when it is first imported, so it is imported here, after
    the variable is set; the Ray processes inherit it and this worktree's ember."""
    saved = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "PYTHONPATH", "EMBER_HOME")}
    src = str(Path(ember.__file__).resolve().parents[1])
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["EMBER_HOME"] = str(tmp_path_factory.mktemp("ray-nodes-home"))  # the machines' own
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, saved["PYTHONPATH"]) if p)
    c = None
    try:
        import ray
        from ray.cluster_utils import Cluster

        c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
        for _ in range(2):
            c.add_node(**NODE)
        ray.init(address=c.address, _node_ip_address="127.0.0.1", namespace="ember-test", log_to_driver=False)
        yield c
    finally:
        if c is not None:
            ray.shutdown()
            c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def models(tiny_llama: tuple[Path, Any], ember_home: Path, tmp_path: Path) -> list[str]:
    """`tiny` (the shared tiny Llama) and `wide` (another config: 3 layers, 8 heads) in
    this test's store, the registry the nodes fetch from."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ember.store import save_tensors

    store = LocalStore(ember_home)
    shutil.copytree(tiny_llama[0], store.path_for("tiny"), copy_function=os.link)
    store.register("tiny")
    cfg = {**TINY_LLAMA, "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 8}
    torch.manual_seed(1)
    model = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    ).to(torch.float64)
    files: dict[str, Any] = {"model/config.json": json.dumps(cfg).encode()}
    for f in (tiny_llama[0] / "model").iterdir():
        if f.name != "config.json":
            files[f"model/{f.name}"] = f
    save_tensors(model.state_dict(), store.path_for("wide"), files=files)
    store.register("wide")
    return ["tiny", "wide"]


@asynccontextmanager
async def ray_controller(home: Path, *, db: str = "ray.db") -> AsyncIterator[tuple[Controller, RayCluster]]:
    """A controller over one agent per alive Ray node, its state in `home/db`."""
    rc = await asyncio.to_thread(
        RayCluster.connect, "auto", str(home / "store"), engine_options=ENGINE, home=str(home)
    )
    c = Controller(
        rc.nodes(),
        state=ClusterState(home / db),
        config=ControllerConfig(start_timeout_s=60.0, tick_s=None),
        clock=FakeClock(),
    )
    try:
        await c.start()
        yield c, rc
    finally:
        await c.close()
        await rc.close()


def request(rid: str, max_tokens: int = 8) -> EngineRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest.make(rid, [1, 17, 42, 99], params)


async def collect(c: Controller, model: str, req: EngineRequest) -> list[int]:
    tokens: list[int] = []
    async for delta in c.generate(model, req):
        tokens += delta.outputs[0].token_ids
    return tokens


def run(work: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 120) -> T:
    return asyncio.run(asyncio.wait_for(work(), timeout_s))


def embedded_tokens(home: Path, model: str, req: EngineRequest) -> list[int]:
    """What one embedded node generates for `req` (the reference for exact tokens)."""

    async def main() -> list[int]:
        c = make_controller(home)
        await c.start([Deployment(model, model, min_instances=0)])
        try:
            return await collect(c, model, req)
        finally:
            await c.close()

    return run(main)


def worker(cluster: Cluster) -> Any:
    """A Ray node other than the head (removing the head would end the cluster)."""
    return next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)


async def stream_through_a_node_death(
    c: Controller, rc: RayCluster, cluster: Cluster, req: EngineRequest
) -> tuple[RayNode, list[int]]:
    """Start "tiny" on a worker node (its DRAM holds the checkpoint), stream `req` from
    it, SIGKILL that node after the first delta, and read the stream to its end (it
    resumes on a live node from its tokens). The dead node's client and the tokens."""
    victim = worker(cluster)
    node = rc.agents[victim.node_id]
    await node.preload("tiny")  # the instance starts there
    await c.deploy(Deployment("tiny", "tiny", min_instances=1))
    await c.wait_ready(60)
    [inst] = instances(await c.status(), "tiny")
    assert inst["node"] == node.node_id
    await hold(node, inst["id"], requests=1, steps=4)  # the stream is mid-way when the node dies
    stream = c.generate("tiny", req)
    tokens = list((await anext(stream)).outputs[0].token_ids)
    assert (await node.engine_stats(inst["id"])).num_running == 1  # not finished yet
    await asyncio.to_thread(cluster.remove_node, victim, allow_graceful=False)  # SIGKILL
    async for delta in stream:
        tokens += delta.outputs[0].token_ids
    return node, tokens


def instances(status: dict[str, Any], name: str) -> list[dict[str, Any]]:
    dep = next(d for d in status["deployments"] if d["name"] == name)
    return list(dep["instances"])


async def hold(node: RayNode, instance_id: str, requests: int, steps: int) -> None:
    """Make the instance's engine (in the node agent's process) wait for `requests`
    requests, run `steps` iterations, then stall: its requests stay running (and can be
    aborted) however long a test takes, so a migration or a node's death finds them
    mid-stream whatever the machine's load. While held, the engine reports nothing to
    run, so its thread waits for the next command (a request, an abort, a stop).
    Installed through Ray's own `__ray_call__` (a closure run on the actor), so the
    product code has no test hook."""

    def install(agent: Any, instance_id: str, requests: int, steps: int) -> None:
        engine = agent.node.engine(instance_id).engine
        step, unfinished, left = engine.step, engine.has_unfinished, [steps]

        def held() -> bool:
            return engine.num_running + engine.num_waiting < requests or left[0] == 0

        def counted_step() -> Any:
            left[0] -= 1
            return step()

        engine.step = counted_step
        engine.has_unfinished = lambda: unfinished() and not held()

    # A closure is pickled by value: the agent's process need not import this module.
    await node.handle.__ray_call__.remote(install, instance_id, requests, steps)


async def eventually(
    check: Callable[[], Coroutine[Any, Any, T | None]], what: str, timeout_s: float = 60
) -> T:
    """Poll `check` (state in another process, or Ray's own view of its nodes: nothing
    to wait on) until it returns something; fail saying `what` was awaited."""
    deadline = time.monotonic() + timeout_s
    while (got := await check()) is None:
        assert time.monotonic() < deadline, f"gave up after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.05)
    return got


def test_two_models_stream_from_agents_on_other_nodes_with_exact_tokens(
    cluster: Cluster, ember_home: Path, models: list[str]
) -> None:
    expected = {m: embedded_tokens(ember_home, m, request(f"ref-{m}", 12)) for m in models}

    async def main() -> None:
        async with ray_controller(ember_home) as (c, rc):
            assert len(rc.nodes()) == 3
            for m in models:
                await c.deploy(Deployment(m, m, min_instances=1))
            await c.wait_ready(60)
            got = await asyncio.gather(*(collect(c, m, request(f"r-{m}", 12)) for m in models))
            assert dict(zip(models, got, strict=True)) == expected
            status = await c.status()
            on = {instances(status, m)[0]["node"] for m in models}
            assert len(on) == 2 and on <= {n.node_id for n in rc.nodes()}
            # The nodes fetched the models from the head's store over HTTP into their caches.
            await c.settle()  # each load is recorded once its weights are all in
            assert "registry" in {load.tier for load in c.state.loads()}
            # each disk copy is written behind its download: poll the status until both are in
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                disks = {n["id"]: n["disk"] for n in status["nodes"]}
                if all(m in disks[instances(status, m)[0]["node"]] for m in models):
                    break
                assert asyncio.get_running_loop().time() < deadline, f"no disk copies: {disks}"
                await asyncio.sleep(0.05)
                status = await c.status()

    run(main)


def test_scales_from_zero_on_the_node_whose_dram_holds_the_checkpoint(
    cluster: Cluster, ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        async with ray_controller(ember_home) as (c, rc):
            holder = rc.agents[worker(cluster).node_id]
            await holder.preload("tiny")
            await c.deploy(Deployment("tiny", "tiny", min_instances=0))
            assert instances(await c.status(), "tiny") == []
            assert len(await collect(c, "tiny", request("cold"))) == 8
            [inst] = instances(await c.status(), "tiny")
            assert inst["node"] == holder.node_id
            await c.settle()
            assert [load.tier for load in c.state.loads()] == ["dram"]
            # The agent's own errors arrive as they were raised, not wrapped by Ray.
            with pytest.raises(OverloadedError) as err:  # its one slot is taken
                await holder.start_instance("x", "x", "tiny")
            assert type(err.value) is OverloadedError and err.value.retry_after_s == 5.0

    run(main)


def test_closing_a_stream_early_aborts_the_request_on_its_node(
    cluster: Cluster, ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        async with ray_controller(ember_home) as (c, rc):
            await c.deploy(Deployment("tiny", "tiny", min_instances=1))
            await c.wait_ready(60)
            [inst] = instances(await c.status(), "tiny")
            node = next(n for n in rc.nodes() if n.node_id == inst["node"])
            stream = c.generate("tiny", request("long", max_tokens=200))
            await anext(stream)
            await stream.aclose()

            async def idle() -> bool | None:  # the abort crosses two processes
                stats = await node.engine_stats(inst["id"])
                return True if stats.num_running + stats.num_waiting == 0 else None

            await eventually(idle, "the closed stream's request to leave its engine", 30)

    run(main)


def test_an_instance_live_migrated_to_another_node_mid_stream_gives_the_tokens_of_an_unmigrated_run(
    cluster: Cluster, ember_home: Path, models: list[str]
) -> None:
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    prompts = [[1, 17, 42, 99], [5, 6, 7, 8, 9]]
    reqs = [EngineRequest.make(f"run{i}", p, params) for i, p in enumerate(prompts)]
    expected = [embedded_tokens(ember_home, "tiny", r) for r in reqs]

    async def stream(c: Controller, req: EngineRequest, started: asyncio.Event) -> list[int]:
        tokens: list[int] = []
        async for delta in c.generate("tiny", req):
            tokens += delta.outputs[0].token_ids
            started.set()
        return tokens

    async def main() -> None:
        async with ray_controller(ember_home) as (c, rc):
            await c.deploy(Deployment("tiny", "tiny", min_instances=1, target_concurrency=8))
            await c.wait_ready(60)
            [inst] = instances(await c.status(), "tiny")
            source = next(n for n in rc.nodes() if n.node_id == inst["node"])
            await hold(source, inst["id"], requests=len(reqs), steps=6)
            started = [asyncio.Event() for _ in reqs]
            streams = [asyncio.create_task(stream(c, r, e)) for r, e in zip(reqs, started, strict=True)]
            await asyncio.gather(*(e.wait() for e in started))  # every client has tokens
            stats = await source.engine_stats(inst["id"])
            assert stats.num_running + stats.num_waiting == len(reqs)  # unfinished: mid-stream
            gauges = (await c.collect_gauges())["tiny"]  # the agent's engine, through its RayNode
            assert gauges.num_running + gauges.num_waiting == len(reqs) and gauges.kv_cache_usage > 0
            dest = next(n for n in rc.nodes() if n.node_id != source.node_id)
            report = await c.instances.migrate(inst["id"], dest.node_id)
            assert report is not None and (report.moved, report.stayed) == (len(reqs), 0)
            assert list(await asyncio.gather(*streams)) == expected
            await c.settle()
            [after] = instances(await c.status(), "tiny")
            assert after["node"] == dest.node_id and after["id"] != inst["id"] and after["state"] == "ready"
            assert (await source.status()).instances == ()  # the source instance is gone
            assert (await dest.status()).instances == (after["id"],)
            parked = dest.handle.__ray_call__.remote(
                lambda agent, i: agent.node.engine(i).engine.num_parked, after["id"]
            )
            assert await parked == 0  # every parked cache was taken over

    run(main)


def test_a_node_that_dies_mid_stream_leaves_the_cluster_and_its_stream_goes_on(
    cluster: Cluster, ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        async with ray_controller(ember_home) as (c, rc):
            node, tokens = await stream_through_a_node_death(c, rc, cluster, request("doomed", 200))
            assert len(tokens) == 200
            with pytest.raises(NodeFailedError):
                await node.status()

            # The watcher's poll: once Ray declares the machine dead, it leaves the
            # controller, and the deployment's minimum instance starts on a live node.
            async def noticed() -> list[str] | None:
                _, gone = await asyncio.to_thread(rc.sync)
                return gone or None

            gone = await eventually(noticed, "Ray to declare the killed node dead", 90)
            assert gone == [node.node_id]
            for node_id in gone:
                await c.remove_node(node_id)
            c.reconcile()
            await c.wait_ready(60)
            assert len(await collect(c, "tiny", request("after"))) == 8
            status = await c.status()
            assert node.node_id not in {n["id"] for n in status["nodes"]}
            assert instances(status, "tiny")[0]["node"] != node.node_id
            # A machine joining again is noticed by the next poll.
            joined = cluster.add_node(**NODE)  # Ray sets signal handlers: main thread only
            added, _ = await asyncio.to_thread(rc.sync)
            assert [n.ray_node_id for n in added] == [joined.node_id]
            assert added[0].node_id == node_name(added[0].ray_node_id)

    run(main)


def test_a_restarted_controller_adopts_the_deployments_and_not_the_dead_instances(
    cluster: Cluster, ember_home: Path, models: list[str]
) -> None:
    async def main() -> None:
        async with ray_controller(ember_home) as (c, rc):
            await c.deploy(Deployment("tiny", "tiny", min_instances=1))
            await c.deploy(Deployment("wide", "wide", min_instances=0))
            await c.wait_ready(60)
            first = instances(await c.status(), "tiny")[0]["id"]
            for node in rc.nodes():  # the controller's process dies: its agents with it
                node.kill()
        async with ray_controller(ember_home) as (c, _):
            assert [d.name for d in c.deployments()] == ["tiny", "wide"]
            assert first not in {r.id for r in c.state.instances()}
            c.reconcile()
            await c.wait_ready(60)
            assert len(await collect(c, "wide", request("w"))) == 8
            [inst] = instances(await c.status(), "tiny")
            assert inst["id"] != first and inst["state"] == "ready"

    run(main)


def test_ember_serve_ray_streams_through_the_controller_actor_which_comes_back_when_killed(
    cluster: Cluster, ember_home: Path, models: list[str]
) -> None:
    """`ember serve --ray`: the HTTP server on the head, the controller a named actor;
    Ray restarts a killed controller, which adopts the deployments from cluster.db."""
    import ray

    settings = ServeSettings(
        models=["tiny"], ray=cluster.address, start_timeout_s=60, log_level="warning", swap="off",
        kv_cache_bytes=ENGINE["kv_cache_bytes"], max_model_len=ENGINE["max_model_len"],
        max_num_seqs=ENGINE["max_num_seqs"],
    )  # fmt: skip
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(build_app(settings), log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    host, port = sock.getsockname()
    url = f"http://{host}:{port}"

    def wait_until(ok: Callable[[], bool], what: str) -> None:
        """Poll the server over HTTP (the state is in Ray's processes) for up to 90 s."""
        deadline = time.monotonic() + 90
        while not ok():
            assert thread.is_alive(), f"the server's thread ended while waiting for {what}"
            assert time.monotonic() < deadline, f"gave up after 90 s waiting for {what}"
            time.sleep(0.2)

    def answers(path: str) -> bool:
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(url + path).status_code == 200
        return False

    try:
        wait_until(lambda: answers("/health"), "/health to answer 200")
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as resp:
            events = [line for line in resp.iter_lines() if line.startswith("data: {")]
        assert resp.status_code == 200 and len(events) >= 6
        before = httpx.get(f"{url}/admin/status").json()
        [first] = before["deployments"][0]["instances"]
        assert first["node"] in {n["id"] for n in before["nodes"]} and len(before["nodes"]) >= 3

        ray.kill(ray.get_actor("ember-controller", namespace="ember"), no_restart=False)
        body["stream"] = False

        def completes() -> bool:
            return httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200

        wait_until(completes, "a completion through the restarted controller")
        after = httpx.get(f"{url}/admin/status").json()
        assert [d["name"] for d in after["deployments"]] == ["tiny"]
        [inst] = after["deployments"][0]["instances"]
        assert inst["id"] != first["id"] and inst["state"] == "ready"

        # The controller's watcher notices a machine joining and one leaving.
        def node_count() -> int:
            # Until the watcher drops a dead node, asking it for its status is a 503.
            resp = httpx.get(f"{url}/admin/status")
            return len(resp.json()["nodes"]) if resp.status_code == 200 else -1

        joined = cluster.add_node(**NODE)
        wait_until(lambda: node_count() == len(after["nodes"]) + 1, "the joined node in /admin/status")
        cluster.remove_node(joined)
        wait_until(lambda: node_count() == len(after["nodes"]), "the removed node to leave /admin/status")
    finally:
        server.should_exit = True
        thread.join(60)


def test_a_stream_on_a_node_that_dies_finishes_elsewhere_with_exact_tokens(
    cluster: Cluster, ember_home: Path, models: list[str]
) -> None:
    expected = embedded_tokens(ember_home, "tiny", request("ref", 200))

    async def main() -> None:
        async with ray_controller(ember_home) as (c, rc):
            _, tokens = await stream_through_a_node_death(c, rc, cluster, request("moving", 200))
            assert tokens == expected

    run(main)


def test_ember_serve_ray_reports_a_model_with_corrupt_weights_failed_and_stops(
    cluster: Cluster, ember_home: Path, models: list[str]
) -> None:
    """The same states and the same stop as embedded: the controller actor fails the
    model after the fetch's checksum error; RayBackend carries its state to /health."""
    part = LocalStore(ember_home).path_for("wide") / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    settings = ServeSettings(
        models=["tiny", "wide"], ray=cluster.address, start_timeout_s=60, log_level="warning", swap="off",
        kv_cache_bytes=ENGINE["kv_cache_bytes"], max_model_len=ENGINE["max_model_len"],
        max_num_seqs=ENGINE["max_num_seqs"],
    )  # fmt: skip
    stopped = threading.Event()
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(build_app(settings, on_failed=stopped.set), log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    host, port = sock.getsockname()
    try:
        assert stopped.wait(120), "the failed model did not stop the server"
        health = httpx.get(f"http://{host}:{port}/health")
        assert health.status_code == 503
        wide = health.json()["models"]["wide"]
        assert wide["state"] == "failed" and "checksum mismatch" in wide["reason"]
    finally:
        server.should_exit = True
        thread.join(60)
