"""EmbeddedNode: what it reads from the registry without loading a model."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from ember.cluster.messages import InstanceInfo
from ember.cluster.node import EmbeddedNode
from ember.errors import CorruptCheckpointError, EmberError
from ember.store.registry import HttpRegistry
from ember.store.registry_server import RegistryServer
from tests.cluster.conftest import ENGINE

pytestmark = pytest.mark.timeout(60)


def test_model_files_come_from_an_http_registry_without_fetching_the_weights(
    ember_home: Path, models: list[str]
) -> None:
    # A controller asks a node for a deployment's config and tokenizer; the weights
    # are left to the node that loads the model (a fetch would make this one look warm).
    with RegistryServer(ember_home / "store") as server, HttpRegistry(server.url) as registry:
        node = EmbeddedNode("node0", registry, home=ember_home, engine_options=ENGINE)
        files = asyncio.run(node.model_files("tiny"))
        assert json.loads(files["config.json"])["model_type"] == "llama"
        assert (ember_home / "store" / "tiny" / "model" / "config.json").read_bytes() == files["config.json"]
        assert node.store.disk.names() == []
        assert set(asyncio.run(node.status()).dram) == set()


def _corrupt_disk_copy(node: EmbeddedNode, model: str) -> None:
    path = node.store.disk.path(model)
    assert path is not None
    part = path / "part-00000.bin"
    data = bytearray(part.read_bytes())
    data[-64] ^= 0xFF
    part.write_bytes(bytes(data))


def test_a_start_from_disk_serves_while_its_weights_arrive(
    ember_home: Path, models: list[str], held_reads: threading.Event
) -> None:
    from tests.cluster.conftest import make_nodes, request

    async def start(node: EmbeddedNode, instance: str) -> InstanceInfo:
        held_reads.clear()  # the weights are still arriving when start_instance returns
        try:
            return await node.start_instance(instance, "tiny", "tiny")
        finally:
            held_reads.set()

    async def tokens(node: EmbeddedNode, instance: str, rid: str) -> list[int]:
        out: list[int] = []
        async for delta in node.generate(instance, request(rid)):
            out += delta.outputs[0].token_ids
        return out

    async def main() -> None:
        [node] = make_nodes(ember_home)
        first = await start(node, "i1")  # registry -> disk, then streamed from disk
        assert first.loading and first.tier == "registry"
        want = await tokens(node, "i1", "a")
        final = await node.instance_loaded("i1")
        assert not final.loading and final.load_s >= first.load_s and final.startup_s >= final.load_s
        await node.stop_instance("i1")

        assert node.store.evict("tiny")
        second = await start(node, "i2")
        assert second.loading and second.tier == "disk"
        assert await tokens(node, "i2", "b") == want
        assert (await node.instance_loaded("i2")).tier == "disk"
        await node.stop_instance("i2")

        assert node.store.evict("tiny")
        _corrupt_disk_copy(node, "tiny")
        bad = await start(node, "i3")
        with pytest.raises(CorruptCheckpointError, match="part-00000.bin"):
            await node.instance_loaded("i3")
        with pytest.raises(EmberError):  # a request on it fails with the load's error
            await tokens(node, "i3", "c")
        status = await node.status()
        assert bad.loading and "tiny" not in status.dram and "tiny" not in status.disk  # refetched next time
        await node.stop_instance("i3")
        assert (await node.status()).free_slots == 1
        await node.close()

    asyncio.run(asyncio.wait_for(main(), 60))
