"""`ember serve --dram-bytes/--disk-bytes/--no-migration` reach the embedded nodes and
the controller's placement."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ember.cluster.controller import Controller
from ember.cluster.node import EmbeddedNode
from ember.server.app import ServerState
from ember.server.runner import start_cluster
from ember.server.settings import ServeSettings
from tests.cluster.conftest import ENGINE

pytestmark = pytest.mark.timeout(120)


async def _cluster(settings: ServeSettings) -> Controller:
    state = ServerState(api_key=None, max_body_bytes=1 << 20, max_in_flight=8)
    backend = await start_cluster(settings, ["tiny"], state)
    assert isinstance(backend, Controller)
    return backend


@pytest.mark.parametrize("no_migration", [False, True])
def test_budgets_and_migration_reach_nodes_and_placement(
    ember_home: Path, models: list[str], no_migration: bool
) -> None:
    settings = ServeSettings(
        models=["tiny"], nodes=2, dram_bytes=3_000_000, disk_bytes=5_000_000, no_migration=no_migration,
        **ENGINE,
    )  # fmt: skip

    async def main() -> None:
        controller = await _cluster(settings)
        try:
            nodes = list(controller.nodes.values())
            assert all(isinstance(n, EmbeddedNode) for n in nodes) and len(nodes) == 2
            for node in nodes:
                assert isinstance(node, EmbeddedNode)
                assert node.store.pool.budget_bytes == 3_000_000
                assert node.store.disk.budget_bytes == 5_000_000
            assert controller.config.migrate is not no_migration
            assert (getattr(controller.policy, "migration", None) is None) is no_migration
        finally:
            await controller.close()

    asyncio.run(main())
