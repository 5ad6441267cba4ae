"""EmbeddedNode: what it reads from the registry without loading a model."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ember.cluster.node import EmbeddedNode
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
