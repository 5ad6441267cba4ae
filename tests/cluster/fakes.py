"""A fake clock and node statuses for the control plane's plain objects."""

from __future__ import annotations

from ember.cluster.messages import InstanceInfo, LoadTier, NodeStatus

GB = 1_000_000_000


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def status(
    node: str, *, free: int = 1, slots: int = 1, dram: tuple[str, ...] = (), disk: tuple[str, ...] = ()
) -> NodeStatus:
    return NodeStatus(node, slots, free, {name: GB for name in dram}, disk)


def loaded(node: str, tier: LoadTier, nbytes: int, seconds: float, overhead_s: float = 0.0) -> InstanceInfo:
    return InstanceInfo("i", "dep", "m", node, tier, nbytes, seconds, seconds + overhead_s, 256)
