"""NodeRuntime: what the control plane asks of a node.

Every argument and result is a picklable message (ember.cluster.messages, the
engine's EngineRequest / RequestOutput / RequestSnapshot) and every method is a
coroutine or an async iterator, so the embedded node in this process and a Ray
actor on another machine implement the same interface. A runtime whose node died
or stopped answering raises ember.errors.NodeFailedError from any call or stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from ember.cluster.messages import BandwidthProbe, InstanceInfo, NodeStatus
from ember.engine.request import EngineRequest, EngineStats, RequestOutput, RequestSnapshot


class NodeRuntime(Protocol):
    node_id: str

    async def start_instance(
        self, instance_id: str, deployment: str, model: str, *, cold: bool = False
    ) -> InstanceInfo:
        """Take a slot, wait for the node's loading queue (one load at a time), lease the
        checkpoint's weights from the node's tiers (fetching from the registry if no
        nearer tier holds it) and start an engine. `cold`: drop the node's cached copies
        first, so the load comes from the registry. OverloadedError if no slot is free.

        A load from disk streams: the instance is returned serving while its weights
        still arrive (`info.loading`), and holds the loading queue until they are in."""
        ...

    async def instance_loaded(self, instance_id: str) -> InstanceInfo:
        """Wait until the instance's weights are all in; its final InstanceInfo (load_s
        and startup_s to the last byte). Raises the load's error (a corrupt chunk: the
        instance cannot serve and should be stopped)."""
        ...

    async def stop_instance(self, instance_id: str) -> None:
        """Shut the instance's engine down (requests still running end with an error),
        release its weights and its slot. Unknown ids are ignored."""
        ...

    def generate(self, instance_id: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas from the instance; closing early aborts it."""
        ...

    async def abort(self, instance_id: str, request_id: str) -> RequestSnapshot | None:
        """Stop a request; its snapshot (tokens, sampler state) lets another node resume it.
        A parked request (prewarm) has its cache freed and no snapshot."""
        ...

    async def prewarm(self, instance_id: str, request: EngineRequest) -> int:
        """Live migration's destination side: compute the KV cache of the request's prompt +
        output tokens and park it under its id without sampling; the tokens cached. Again
        with more tokens, only the new ones are computed; generate() with the same id
        continues from the parked cache; abort() frees it (so does the node after a while)."""
        ...

    async def engine_stats(self, instance_id: str) -> EngineStats:
        """The instance's engine figures now: requests running and waiting, KV cache
        usage, preemption and swap counters (the controller's gauges).
        ModelNotFoundError for an instance the node does not run."""
        ...

    async def status(self) -> NodeStatus: ...

    async def probe_bandwidth(self) -> BandwidthProbe:
        """A short measurement of the node's tiers (bytes/s), for the estimator's start."""
        ...

    async def checkpoint_size(self, model: str) -> int:
        """Bytes of the checkpoint's tensors, from the nearest copy's index."""
        ...

    async def model_files(self, model: str) -> dict[str, bytes]:
        """The checkpoint's model/ files (config, tokenizer, templates), no weights."""
        ...

    async def close(self) -> None:
        """Stop every instance on the node."""
        ...
