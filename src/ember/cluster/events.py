"""ClusterEvents: what the control plane reports as it scales and moves requests (metrics listen)."""

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

    def migrated(self, deployment: str, moved: int, stayed: int) -> None:
        """A live migration ended: `moved` requests now run on the destination, `stayed`
        ones on the source (the destination failed)."""
        ...

    def failed_over(self, deployment: str) -> None:
        """A request whose node failed resumed on another instance."""
        ...

    def reclaimed(self, deployment: str) -> None:
        """An idle instance of `deployment` was stopped before its keep-alive ended: a
        start needed its slot."""
        ...


class NoEvents:
    def instance_started(self, deployment: str, info: InstanceInfo, observed: Observation) -> None:
        pass

    def scaled(self, deployment: str, direction: Direction) -> None:
        pass

    def migrated(self, deployment: str, moved: int, stayed: int) -> None:
        pass

    def failed_over(self, deployment: str) -> None:
        pass

    def reclaimed(self, deployment: str) -> None:
        pass
