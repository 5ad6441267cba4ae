"""What the Ray mode adds and costs against the embedded mode, on this machine.

    PYTHONPATH=src .venv/bin/python scripts/ray_overhead.py [--model smollm2|tiny] [--tokens 64]

For each mode, with SmolLM2-135M-Instruct (float32) in the store: time to first token
of a request that finds the deployment scaled to zero with the weights on the node's
disk, then with them in its DRAM pool; the mean gap between streamed tokens of a warm
instance; and the resident memory of everything the mode runs. Ray mode is the real
`ember serve --ray` path: the controller a Ray actor, one node agent, a one-node Ray
cluster started here (no dashboard, 80 MB object store); a token crosses two actor
hops. RSS sums counted shared pages once per process (an upper bound).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported

import contextlib
import itertools

import psutil

ENGINE = {"max_model_len": 512, "kv_cache_bytes": 64 << 20, "max_num_seqs": 8, "swap": "off"}
PROMPT = [1, 17, 42, 99, 5, 7, 11, 13]
ROUNDS = 3  # starts from DRAM and warm streams, each; medians reported


def rss_mb(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 1e6


def by_process(procs: list[psutil.Process]) -> dict[str, float]:
    """RSS (MB) by process title: the driver, ray::NodeAgent, gcs_server, raylet, ..."""
    out: dict[str, float] = {}
    for p in procs:
        try:
            cmd = p.cmdline()
            title = Path(cmd[0]).name if cmd else p.name()
            title = "driver" if p.pid == os.getpid() else title.split()[0][:40]
            out[title] = round(out.get(title, 0.0) + p.memory_info().rss / 1e6, 1)
        except psutil.Error:
            pass
    return out


def request(rid: str, max_tokens: int) -> Any:
    from ember.engine.request import EngineRequest, SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest.make(rid, PROMPT, params)


async def timed_stream(backend: Any, model: str, rid: str, max_tokens: int) -> tuple[float, list[float]]:
    """(seconds to the first token, gaps between later deltas in seconds)."""
    start = time.perf_counter()
    stamps = []
    async for delta in backend.generate(model, request(rid, max_tokens)):
        if delta.outputs[0].token_ids:
            stamps.append(time.perf_counter())
    return stamps[0] - start, [b - a for a, b in itertools.pairwise(stamps)]


async def zero_instances(status: Any, name: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        s = await status()
        if not next(d for d in s["deployments"] if d["name"] == name)["instances"]:
            return
        assert time.monotonic() < deadline, "the instance never scaled to zero"
        await asyncio.sleep(0.2)


async def measure(backend: Any, status: Any, deploy: Any, model: str, tokens: int) -> dict[str, float]:
    from ember.cluster.state import Deployment

    await deploy(Deployment(model, model, min_instances=0, keep_alive_s=0.5))
    disk, _ = await timed_stream(backend, model, "disk", 2)
    drams, gaps = [], []
    for i in range(ROUNDS):
        await zero_instances(status, model)
        drams.append((await timed_stream(backend, model, f"dram{i}", 2))[0])
        gaps += (await timed_stream(backend, model, f"warm{i}", tokens))[1]
    return {
        "ttft_from_zero_disk_s": disk,
        "ttft_from_zero_dram_s_median": statistics.median(drams),
        "token_gap_mean_ms": statistics.mean(gaps) * 1e3,
        "token_gap_p50_ms": statistics.median(gaps) * 1e3,
    }


async def embedded(home: Path, model: str, tokens: int) -> dict[str, float]:
    from ember.cluster.controller import Controller, ControllerConfig
    from ember.cluster.node import EmbeddedNode
    from ember.cluster.state import ClusterState
    from ember.store.registry import DirectoryRegistry

    registry = DirectoryRegistry(home / "store")
    node = EmbeddedNode(f"node-{os.getpid()}", registry, home=home, engine_options=ENGINE)
    await asyncio.to_thread(node.store.disk.fetch, model, registry)  # on disk, as in Ray mode
    state = ClusterState(home / f"embedded-{os.getpid()}.db")
    c = Controller([node], state=state, config=ControllerConfig(tick_s=0.2))
    await c.start()
    try:
        out = await measure(c, c.status, c.deploy, model, tokens)
        out["rss_mb"] = rss_mb([psutil.Process()])
        out["tiers"] = [load.tier for load in c.state.loads()]  # type: ignore[assignment]
        return out
    finally:
        await c.close()


async def on_ray(home: Path, model: str, tokens: int, up_s: float) -> dict[str, float]:
    from ember.cluster.ray_controller import RayBackend, RayControllerConfig
    from ember.cluster.state import ClusterState

    for stale in (home / "cluster.db", home / "nodes"):  # a fresh control plane, a cold node
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    config = RayControllerConfig(
        home=str(home), registry=str(home / "store"), engine_options=ENGINE, tick_s=0.2, agent_home=str(home)
    )
    start = time.perf_counter()
    backend = RayBackend.spawn(config)
    await backend.start(120)
    ready_s = time.perf_counter() - start
    try:
        out = await measure(backend, backend.status, backend.deploy, model, tokens)
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        out["rss_mb"] = rss_mb(procs)
        out["rss_by_process_mb"] = by_process(procs)  # type: ignore[assignment]
        out["ray_up_s"] = up_s
        out["controller_and_agents_up_s"] = ready_s
        out["tiers"] = [load.tier for load in ClusterState(home / "cluster.db").loads()]  # type: ignore[assignment]
        return out
    finally:
        await backend.close()


class _Source:
    """Yields its clock every `gap_s` (a decode step), like a node agent's stream."""

    async def stream(self, n: int, gap_s: float) -> Any:
        for _ in range(n):
            await asyncio.sleep(gap_s)
            yield time.time()


class _Relay:
    """Passes a source's stream on, as the controller actor does."""

    async def stream(self, source: Any, n: int, gap_s: float) -> Any:
        async for ref in source.stream.options(num_returns="streaming").remote(n, gap_s):
            yield await ref


async def hop_latency(n: int = 200, gap_s: float = 0.03) -> dict[str, float]:
    """Median ms from an item's yield in an actor to its arrival here, one and two hops."""
    import ray

    source = ray.remote(_Source).remote()
    relay = ray.remote(_Relay).remote()
    out = {}
    for hops, stream in (
        (1, lambda: source.stream.options(num_returns="streaming").remote(n, gap_s)),
        (2, lambda: relay.stream.options(num_returns="streaming").remote(source, n, gap_s)),
    ):
        delays = []
        async for ref in stream():
            sent = await ref
            delays.append(time.time() - sent)
        out[f"{hops}_hop_delay_ms_p50"] = statistics.median(delays) * 1e3
        out[f"{hops}_hop_delay_ms_p99"] = sorted(delays)[int(0.99 * len(delays))] * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--mode", choices=["both", "embedded", "ray"], default="both")
    parser.add_argument("--home", type=Path, help="An EMBER_HOME whose store holds SmolLM2 already.")
    args = parser.parse_args()
    from ember.store.importer import DEFAULT_MODEL_NAME, default_model_source, import_checkpoint
    from ember.store.local import LocalStore

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp)
        os.environ["EMBER_HOME"] = str(home)
        if not LocalStore(home).exists(DEFAULT_MODEL_NAME):
            import_checkpoint(default_model_source(), DEFAULT_MODEL_NAME, store=LocalStore(home))
        if args.mode in ("both", "embedded"):
            results["embedded"] = asyncio.run(embedded(home, DEFAULT_MODEL_NAME, args.tokens))
        if args.mode in ("both", "ray"):
            import ray
            from ray.cluster_utils import Cluster

            start = time.perf_counter()
            cluster = Cluster(
                initialize_head=True,
                head_node_args={"node_ip_address": "127.0.0.1", "num_cpus": 1, "include_dashboard": False,
                                "object_store_memory": 80 << 20},
            )  # fmt: skip
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
            up_s = time.perf_counter() - start
            try:
                results["ray_hops"] = asyncio.run(hop_latency())
                results["ray"] = asyncio.run(on_ray(home, DEFAULT_MODEL_NAME, args.tokens, up_s))
            finally:
                ray.shutdown()
                cluster.shutdown()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
