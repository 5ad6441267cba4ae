"""RayNode: a cluster node on another machine, behind the NodeRuntime interface.

`NodeAgent` is a Ray actor pinned to one Ray node (hard node affinity): it owns an
EmbeddedNode there (slots, DRAM pool, disk cache under that machine's
`$EMBER_HOME/nodes/<id>/`, engines), which fetches checkpoints from the registry
URL it was given. `RayNode` is the control plane's side: every NodeRuntime call is
one actor call, and a token stream is a Ray streaming generator (one object per
delta); closing it early cancels the agent's generator, which aborts the request.

A node that dies (its actor, its worker process or the whole machine) turns every
call and stream into NodeFailedError(node=...), at once rather than a hang: Ray
fails a call in flight to a dead actor as soon as it learns of the death.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.cluster.messages import BandwidthProbe, InstanceInfo, NodeStatus
from ember.cluster.node import PROBE_BYTES, EmbeddedNode
from ember.engine.request import EngineRequest, EngineStats, RequestOutput, RequestSnapshot
from ember.errors import MissingDependencyError, NodeFailedError
from ember.store.node import DEFAULT_DISK_BUDGET, DEFAULT_DRAM_BUDGET
from ember.store.registry import open_registry

STATUS_TIMEOUT_S = 10.0  # a node whose status takes longer has stopped answering


def import_ray() -> Any:
    """The ray module, or MissingDependencyError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(
            "the Ray runtime needs the 'ray' package: pip install 'ember[ray]'"
        ) from exc
    return ray


@dataclass(frozen=True)
class AgentOptions:
    """What every node agent is started with. `home`: EMBER_HOME on the agent's machine
    (None: that machine's own EMBER_HOME, from the environment `ray start` ran in)."""

    registry: str  # a directory or http(s) URL every machine can read
    registry_described: str = "the registry"  # "the store": the head's store, served over HTTP
    engine_options: dict[str, Any] = field(default_factory=dict)
    home: str | None = None
    dram_budget: int = DEFAULT_DRAM_BUDGET
    disk_budget: int = DEFAULT_DISK_BUDGET
    probe_bytes: int = PROBE_BYTES


class NodeAgent:
    """The Ray actor on one Ray node: an EmbeddedNode in the actor's process. Every
    method is async, so the actor serves many calls and streams at once."""

    def __init__(self, node_id: str, slots: int, options: AgentOptions) -> None:
        # Paid once when the agent starts, not by its first cold start (~1.5 s of imports).
        import ember.engine.loader  # noqa: F401

        self.node = EmbeddedNode(
            node_id,
            open_registry(options.registry, described=options.registry_described),
            slots=slots,
            home=Path(options.home) if options.home is not None else None,
            engine_options=options.engine_options,
            dram_budget=options.dram_budget,
            disk_budget=options.disk_budget,
            probe_bytes=options.probe_bytes,
        )

    async def start_instance(self, instance_id: str, deployment: str, model: str, cold: bool) -> InstanceInfo:
        return await self.node.start_instance(instance_id, deployment, model, cold=cold)

    async def instance_loaded(self, instance_id: str) -> InstanceInfo:
        return await self.node.instance_loaded(instance_id)

    async def stop_instance(self, instance_id: str) -> None:
        await self.node.stop_instance(instance_id)

    async def generate(self, instance_id: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        # Cancelling this task (RayNode closing its stream) raises CancelledError in the
        # engine's stream, whose clean-up aborts the request and frees its KV blocks.
        async for delta in self.node.generate(instance_id, request):
            yield delta

    async def abort(self, instance_id: str, request_id: str) -> RequestSnapshot | None:
        return await self.node.abort(instance_id, request_id)

    async def prewarm(self, instance_id: str, request: EngineRequest) -> int:
        return await self.node.prewarm(instance_id, request)

    async def status(self) -> NodeStatus:
        return await self.node.status()

    async def probe_bandwidth(self) -> BandwidthProbe:
        return await self.node.probe_bandwidth()

    async def checkpoint_size(self, model: str) -> int:
        return await self.node.checkpoint_size(model)

    async def model_files(self, model: str) -> dict[str, bytes]:
        return await self.node.model_files(model)

    async def preload(self, model: str) -> None:
        """Put a checkpoint in this node's DRAM pool (and disk cache), as a past
        instance would have left it."""
        lease, _, _ = await asyncio.to_thread(self.node.store.acquire, model)
        lease.release()

    async def engine_stats(self, instance_id: str) -> EngineStats:
        return await self.node.engine_stats(instance_id)

    async def close(self) -> None:
        await self.node.close()


class RayNode:
    """A NodeRuntime whose node is a NodeAgent actor (see `spawn`)."""

    def __init__(self, node_id: str, handle: Any, *, ray_node_id: str = "") -> None:
        self.node_id = node_id
        self.handle = handle
        self.ray_node_id = ray_node_id

    @classmethod
    def spawn(cls, node_id: str, ray_node_id: str, slots: int, options: AgentOptions) -> RayNode:
        """Start a NodeAgent on Ray node `ray_node_id` (hard affinity: never elsewhere).
        It takes no CPU from Ray's accounting: its slots are Ember's to count."""
        ray = import_ray()
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor = ray.remote(NodeAgent).options(
            num_cpus=0,
            max_restarts=0,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray_node_id, soft=False),
        )
        return cls(node_id, actor.remote(node_id, slots, options), ray_node_id=ray_node_id)

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except Exception as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: Exception) -> Exception:
        """The agent's own error as it raised it; a dead actor or machine as
        NodeFailedError; anything else unchanged."""
        ray = import_ray()
        if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, Exception):
            return exc.cause if not _is_node_failure(ray, exc.cause) else self._failed(exc.cause)
        if _is_node_failure(ray, exc):
            return self._failed(exc)
        return exc

    def _failed(self, exc: Exception) -> NodeFailedError:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return NodeFailedError(f"node {self.node_id} failed: {reason}", node=self.node_id)

    async def start_instance(
        self, instance_id: str, deployment: str, model: str, *, cold: bool = False
    ) -> InstanceInfo:
        info: InstanceInfo = await self._call("start_instance", instance_id, deployment, model, cold)
        return info

    async def instance_loaded(self, instance_id: str) -> InstanceInfo:
        info: InstanceInfo = await self._call("instance_loaded", instance_id)
        return info

    async def stop_instance(self, instance_id: str) -> None:
        await self._call("stop_instance", instance_id)

    async def generate(self, instance_id: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        try:
            async with contextlib.aclosing(ray_deltas(self.handle.generate, instance_id, request)) as deltas:
                async for delta in deltas:  # closed with this stream: an early close cancels it
                    yield delta
        except Exception as exc:
            raise self._translate(exc) from exc

    async def abort(self, instance_id: str, request_id: str) -> RequestSnapshot | None:
        snapshot: RequestSnapshot | None = await self._call("abort", instance_id, request_id)
        return snapshot

    async def prewarm(self, instance_id: str, request: EngineRequest) -> int:
        cached: int = await self._call("prewarm", instance_id, request)
        return cached

    async def status(self) -> NodeStatus:
        try:
            status: NodeStatus = await asyncio.wait_for(self._call("status"), STATUS_TIMEOUT_S)
        except TimeoutError:
            raise NodeFailedError(
                f"node {self.node_id} did not answer within {STATUS_TIMEOUT_S:g} s", node=self.node_id
            ) from None
        return status

    async def probe_bandwidth(self) -> BandwidthProbe:
        probe: BandwidthProbe = await self._call("probe_bandwidth")
        return probe

    async def checkpoint_size(self, model: str) -> int:
        size: int = await self._call("checkpoint_size", model)
        return size

    async def model_files(self, model: str) -> dict[str, bytes]:
        files: dict[str, bytes] = await self._call("model_files", model)
        return files

    async def preload(self, model: str) -> None:
        """Put `model` in the node's DRAM pool and disk cache (operators, tests)."""
        await self._call("preload", model)

    async def engine_stats(self, instance_id: str) -> EngineStats:
        stats: EngineStats = await self._call("engine_stats", instance_id)
        return stats

    async def close(self) -> None:
        """Stop every instance on the node; a node already gone has none to stop."""
        with contextlib.suppress(NodeFailedError):
            await self._call("close")

    def kill(self) -> None:
        """End the agent's process (its instances die with it)."""
        with contextlib.suppress(Exception):
            import_ray().kill(self.handle, no_restart=True)


async def ray_deltas(method: Any, *args: Any) -> AsyncGenerator[RequestOutput]:
    """The RequestOutputs an actor's streaming generator `method(*args)` yields. Left
    before the last one, the Ray stream is cancelled: the actor's generator ends, which
    aborts the request it was serving."""
    stream = method.options(num_returns="streaming").remote(*args)
    finished = False
    try:
        async for ref in stream:
            delta: RequestOutput = await ref
            finished = delta.finished
            yield delta
    finally:
        if not finished:
            with contextlib.suppress(Exception):
                import_ray().cancel(stream)


def _is_node_failure(ray: Any, exc: BaseException) -> bool:
    e = ray.exceptions
    dead = (
        e.RayActorError,  # ActorDiedError, ActorUnavailableError: the actor or its process
        e.NodeDiedError,
        e.WorkerCrashedError,
        e.LocalRayletDiedError,
        e.ObjectLostError,  # a delta lost with the machine that held it
    )
    return isinstance(exc, dead)
