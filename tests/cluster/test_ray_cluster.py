"""How many instance slots a Ray node offers (no Ray cluster needed)."""

from __future__ import annotations

from ember.cluster.ray_cluster import node_slots


def test_slots_come_from_gpus_then_the_ember_slots_resource_then_the_default() -> None:
    assert node_slots({"CPU": 8, "GPU": 4, "ember_slots": 2}) == 4
    assert node_slots({"CPU": 8, "ember_slots": 2}) == 2
    assert node_slots({"CPU": 8}, default=3) == 3
