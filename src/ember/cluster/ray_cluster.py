"""RayCluster: the machines of a Ray cluster as the control plane's nodes.

One NodeAgent (ember.cluster.ray_node) per alive Ray node, kept in step with
`ray.nodes()`: `watch` polls it every second, adds a node that joined to the
controller and removes one that died. A node's slots come from its Ray resources:
its GPUs, else the custom resource `ember_slots` (`ray start --resources
'{"ember_slots": 2}'`), else the default (`ember serve --slots`, 1).

Checkpoints reach the other machines from the registry: an http(s) registry is
handed to the agents as it is; a directory registry (by default the head's own
store) is served to them over HTTP from the head by a RegistryServer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ember.cluster.ray_node import AgentOptions, RayNode, import_ray
from ember.cluster.runtime import NodeRuntime
from ember.store.local import is_store_root
from ember.store.node import DEFAULT_DISK_BUDGET, DEFAULT_DRAM_BUDGET
from ember.store.registry_server import RegistryServer

log = logging.getLogger(__name__)

SLOTS_RESOURCE = "ember_slots"
NAMESPACE = "ember"
WATCH_PERIOD_S = 1.0


class Membership(Protocol):
    """What the watcher changes on the controller (Controller.add_node/remove_node)."""

    async def add_node(self, node: NodeRuntime) -> None: ...

    async def remove_node(self, node_id: str) -> None: ...


def node_slots(resources: Mapping[str, float], default: int = 1) -> int:
    """Instance slots of a Ray node: one per GPU; on a CPU-only node the `ember_slots`
    resource it was started with, else `default`."""
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        return gpus
    slots = int(resources.get(SLOTS_RESOURCE, 0))
    return slots if slots > 0 else default


def node_name(ray_node_id: str) -> str:
    """The Ember node id of a Ray node (also its directory under EMBER_HOME/nodes/)."""
    return f"ray-{ray_node_id[:12]}"


class RayCluster:
    """Node agents on the alive Ray nodes (the caller has run ray.init, or `connect`)."""

    def __init__(
        self,
        options: AgentOptions,
        *,
        default_slots: int = 1,
        registry_server: RegistryServer | None = None,
        list_nodes: Callable[[], Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        self.options = options
        self.default_slots = default_slots
        self.registry_server = registry_server
        self._list_nodes = list_nodes or (lambda: import_ray().nodes())
        self.agents: dict[str, RayNode] = {}  # Ray node id -> its agent
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    def connect(
        cls,
        address: str,
        registry: str,
        *,
        engine_options: dict[str, Any] | None = None,
        default_slots: int = 1,
        home: str | None = None,
        budgets: tuple[int, int] = (DEFAULT_DRAM_BUDGET, DEFAULT_DISK_BUDGET),
    ) -> RayCluster:
        """Join the Ray cluster at `address` ("auto": the one started on this machine
        with `ray start --head`), serve a directory `registry` over HTTP from here, and
        start an agent on every alive node. `budgets`: each agent's DRAM pool and disk
        cache, bytes."""
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
        server = None
        described = "the registry"
        if not registry.startswith(("http://", "https://")):
            root = registry.removeprefix("file://")
            described = "the store" if is_store_root(Path(root)) else described
            server = RegistryServer(root, host=ray.util.get_node_ip_address())
            registry = server.url
            log.info("serving %s to the Ray nodes at %s", described, registry.rsplit("/", 1)[0])
        options = AgentOptions(
            registry, registry_described=described, engine_options=engine_options or {}, home=home,
            dram_budget=budgets[0], disk_budget=budgets[1],
        )  # fmt: skip
        cluster = cls(options, default_slots=default_slots, registry_server=server)
        cluster.sync()
        return cluster

    def nodes(self) -> list[RayNode]:
        return list(self.agents.values())

    def sync(self) -> tuple[list[RayNode], list[str]]:
        """Start agents on nodes that joined, forget those on nodes that are gone.
        Returns (new nodes, ids of the gone ones)."""
        alive = {n["NodeID"]: n for n in self._list_nodes() if n.get("Alive")}
        added = []
        for ray_id, info in alive.items():
            if ray_id not in self.agents:
                slots = node_slots(info.get("Resources", {}), self.default_slots)
                node = RayNode.spawn(node_name(ray_id), ray_id, slots, self.options)
                self.agents[ray_id] = node
                added.append(node)
                log.info("Ray node %s joined as %s with %d slot(s)", ray_id[:12], node.node_id, slots)
        gone = [self.agents.pop(ray_id).node_id for ray_id in list(self.agents) if ray_id not in alive]
        for node_id in gone:
            log.warning("Ray node of %s is gone", node_id)
        return added, gone

    def watch(self, controller: Membership, period_s: float = WATCH_PERIOD_S) -> None:
        """Keep `controller`'s nodes in step with the Ray cluster, polling every `period_s`."""
        self._watcher = asyncio.create_task(self._watch(controller, period_s))

    async def _watch(self, controller: Membership, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                added, gone = await asyncio.to_thread(self.sync)
                for node_id in gone:
                    await controller.remove_node(node_id)
            except Exception:
                log.exception("watching the Ray nodes failed")
                continue
            for node in added:
                try:
                    await controller.add_node(node)
                except Exception as exc:  # its agent failed to start: the next poll tries again
                    log.warning("node %s could not join: %s", node.node_id, exc)
                    self.agents.pop(node.ray_node_id, None)
                    node.kill()

    async def close(self) -> None:
        """Stop watching, end every agent (and its instances), stop serving the registry."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for node in self.agents.values():
            node.kill()
        self.agents.clear()
        if self.registry_server is not None:
            self.registry_server.close()
