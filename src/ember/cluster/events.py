"""ClusterEvents: what the control plane reports as it scales (metrics listen)."""

from __future__ import annotations

from typing import Literal, Protocol

from ember.cluster.estimator import Observation
from ember.cluster.messages import InstanceInfo

Direction = Literal["up", "down"]


class ClusterEvents(Protocol):
    def instance_started(self, deployment: str, info: InstanceInfo, observed: Observation) -> None:
        """An instance became ready: its tier, bytes, load time, estimate vs actual."""
        ...

    def scaled(self, deployment: str, direction: Direction) -> None:
        """An instance is being started (up) or stopped (down)."""
        ...


class NoEvents:
    def instance_started(self, deployment: str, info: InstanceInfo, observed: Observation) -> None:
        pass

    def scaled(self, deployment: str, direction: Direction) -> None:
        pass
