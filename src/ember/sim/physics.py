"""What a simulated server does physically: slots, a DRAM pool and an SSD cache with LRU
eviction, and one loading queue (a load at a time, as a real node's loading queue and
the estimator's model of it: a second load waits for the first, each at its tier's full
bandwidth). Nothing here decides anything; ember.sim.simulator asks the real control
plane and applies its answers here.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from ember.cluster.messages import LoadTier, NodeStatus
from ember.cluster.placement import NodeView
from ember.sim.config import ServerSpec


@dataclass
class LruTier:
    """Checkpoints held by one storage tier, least recently used first (bytes)."""

    capacity: int
    held: OrderedDict[str, int] = field(default_factory=OrderedDict)
    used: int = 0

    def touch(self, model: str, nbytes: int) -> None:
        """`model` was just used: keep it, evicting the least recently used to fit."""
        if model in self.held:
            self.held.move_to_end(model)
            return
        if nbytes > self.capacity:
            return
        while self.used + nbytes > self.capacity:
            _, size = self.held.popitem(last=False)
            self.used -= size
        self.held[model] = nbytes
        self.used += nbytes


@dataclass
class RegistryLink:
    """One link in front of the registry that every server's downloads share, first come
    first served (a real link shares its bandwidth among them at once; over a download
    the two end about alike, and the cluster's throughput is the same)."""

    bps: float
    free_at: float = 0.0  # when the link has sent every byte booked so far (virtual s)

    def book(self, at: float, nbytes: int) -> float:
        """A download of `nbytes` that may begin at `at`: the virtual time it has crossed."""
        self.free_at = max(at, self.free_at) + nbytes / self.bps
        return self.free_at


@dataclass
class SimServer:
    node_id: str
    spec: ServerSpec
    free: int  # GPU slots not taken by an instance (loading or running)
    dram: LruTier
    ssd: LruTier
    load_free_at: float = 0.0  # when the loading queue is next free (virtual s)
    _status: NodeStatus | None = None  # cached until the slots or caches change
    _idle_view: NodeView | None = None

    @classmethod
    def make(cls, node_id: str, spec: ServerSpec) -> SimServer:
        return cls(node_id, spec, spec.gpus, LruTier(spec.dram_bytes), LruTier(spec.ssd_bytes))

    def status(self) -> NodeStatus:
        """What the node would report (NodeStatus), rebuilt only after a change."""
        if self._status is None:
            self._status = NodeStatus(
                self.node_id, self.spec.gpus, self.free, dict(self.dram.held), tuple(self.ssd.held)
            )
        return self._status

    def idle_view(self) -> NodeView:
        """Placement's view of this server while it runs nothing (cached with the status)."""
        status = self.status()
        if self._idle_view is None or self._idle_view.status is not status:
            self._idle_view = NodeView(status)
        return self._idle_view

    def take(self, slots: int) -> None:
        assert self.free >= slots, (self.node_id, self.free, slots)
        self.free -= slots
        self._status = None

    def give_back(self, slots: int) -> None:
        self.free += slots
        self._status = None

    def tier_of(self, model: str, *, cold: bool) -> LoadTier:
        """Where a load of `model` reads from: the fastest tier holding it (registry if cold)."""
        if cold:
            return "registry"
        if model in self.dram.held:
            return "dram"
        return "disk" if model in self.ssd.held else "registry"

    def load_seconds(self, tier: LoadTier, nbytes: int) -> float:
        """Seconds to read `nbytes` from `tier` into GPU memory."""
        bps = {"dram": self.spec.dram_bps, "disk": self.spec.ssd_bps, "registry": self.spec.network_bps}[tier]
        return nbytes / bps

    def queue_load(
        self,
        now: float,
        tier: LoadTier,
        nbytes: int,
        *,
        standard: bool = False,
        link: RegistryLink | None = None,
    ) -> tuple[float, float]:
        """Join the loading queue: (load seconds, virtual time the instance is ready).
        `standard`: a download is written to SSD first, then read by a standard loader
        at baseline_load_bps (no streaming, not Ember's loader). `link`: downloads also
        wait their turn on the registry's link."""
        begin = max(now, self.load_free_at)
        load_s = self.load_seconds(tier, nbytes)
        if link is not None and tier == "registry":
            load_s = max(load_s, link.book(begin, nbytes) - begin)
        if standard and tier == "registry":
            load_s += nbytes / self.spec.baseline_load_bps
        self.load_free_at = begin + load_s + self.spec.overhead_s
        return load_s, self.load_free_at

    def loaded(self, model: str, nbytes: int, tier: LoadTier) -> None:
        """A load finished: the checkpoint is now in DRAM (and on SSD after a download)."""
        self.dram.touch(model, nbytes)
        if tier != "dram":  # a download is written to SSD; a disk read keeps it recent there
            self.ssd.touch(model, nbytes)
        self._status = None
