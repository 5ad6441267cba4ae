"""StartupTimeEstimator: how long a model would take to start on each node.

    start-up time = q + n / b + c

q: the wait for the node's loading queue (one load at a time per node), from the
   estimates of the loads queued there and how long the running one has run;
n: the checkpoint's size in bytes;
b: the bandwidth of the fastest tier on that node that holds it (DRAM, disk, or a
   registry download, which always holds it);
c: the node's fixed cost of building a model and engine once the weights are in
   (a node that has not loaded yet is assumed to cost what the others did).

b starts from a short probe of each node (or conservative priors) and, like c, is
recalibrated from every finished load by an exponentially weighted average of
seconds per byte: a wrong estimate (a throttled disk) halves its error per load
with the default alpha of 0.5. A load under MIN_BANDWIDTH_SAMPLE_BYTES measures
latency (thread hand-offs, a scheduler's time slice), not bandwidth: it leaves b as
it was, or a DRAM copy of a small model could look slower than a download.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ember.cluster.messages import TIERS, BandwidthProbe, InstanceInfo, LoadTier, NodeStatus

# bytes/s assumed for a node that was not probed, until its first load says better
PRIOR_BYTES_PER_S: dict[LoadTier, float] = {"dram": 8e9, "disk": 1e9, "registry": 100e6}
PRIOR_OVERHEAD_S = 0.05
MIN_BANDWIDTH_SAMPLE_BYTES = 64 << 20


@dataclass(frozen=True)
class StartupEstimate:
    """The expected start-up of `checkpoint` on `node` (seconds)."""

    node: str
    tier: LoadTier
    queue_s: float
    load_s: float  # n / b + c

    @property
    def total_s(self) -> float:
        return self.queue_s + self.load_s


@dataclass(frozen=True)
class Observation:
    """A finished load: what the estimate said and what happened (s)."""

    node: str
    tier: LoadTier
    nbytes: int
    estimated_s: float
    actual_s: float


@dataclass
class _Pending:
    token: int
    estimate: StartupEstimate
    begun: float
    head_since: float | None  # when it reached the head of the node's queue (it runs)


def tiers_holding(status: NodeStatus, checkpoint: str) -> list[LoadTier]:
    """The tiers of a node that could serve `checkpoint` (the registry always can)."""
    tiers: list[LoadTier] = []
    if checkpoint in status.dram:
        tiers.append("dram")
    if checkpoint in status.disk:
        tiers.append("disk")
    tiers.append("registry")
    return tiers


class StartupTimeEstimator:
    """Per-node tier bandwidths, loading queues and the estimate placement minimises.
    Thread-safe; `clock` (seconds) times the queues."""

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        priors: dict[LoadTier, float] | None = None,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.clock = clock
        self._priors = dict(priors or PRIOR_BYTES_PER_S)
        self._s_per_byte: dict[tuple[str, LoadTier], float] = {}
        self._overhead: dict[str, float] = {}
        self._any_overhead = PRIOR_OVERHEAD_S  # averaged over every node's loads
        self._queues: dict[str, list[_Pending]] = {}
        self._token_node: dict[int, str] = {}  # a queued load's token -> its node
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()

    # -- bandwidths -------------------------------------------------------------------

    def calibrate(self, probe: BandwidthProbe) -> None:
        """Set a node's bandwidths from a probe (tiers it could not probe keep theirs)."""
        with self._lock:
            for tier, bps in probe.bytes_per_s.items():
                if tier in TIERS and bps > 0:
                    self._s_per_byte[(probe.node_id, tier)] = 1.0 / bps  # type: ignore[index]

    def bandwidth(self, node: str, tier: LoadTier) -> float:
        """Current bytes/s of `tier` on `node`."""
        with self._lock:
            return 1.0 / self._spb(node, tier)

    def overhead(self, node: str) -> float:
        with self._lock:
            return self._node_overhead(node)

    def _node_overhead(self, node: str) -> float:
        return self._overhead.get(node, self._any_overhead)

    def _spb(self, node: str, tier: LoadTier) -> float:
        return self._s_per_byte.get((node, tier), 1.0 / self._priors[tier])

    # -- estimates --------------------------------------------------------------------

    def estimate(self, status: NodeStatus, checkpoint: str, nbytes: int) -> StartupEstimate:
        """The start-up time of `checkpoint` on this node: queue wait + n / b + c, with b
        the fastest tier (by measured bandwidth, not a fixed ranking) that holds it."""
        with self._lock:
            return self._estimate(status, checkpoint, nbytes)

    def estimate_many(
        self, statuses: Sequence[NodeStatus], checkpoint: str, nbytes: int
    ) -> list[StartupEstimate]:
        """estimate() of every node, under one lock: placement asks for all of them.
        A subclass that overrides estimate() gets its own answers, one call a node."""
        if type(self).estimate is not StartupTimeEstimator.estimate:
            return [self.estimate(s, checkpoint, nbytes) for s in statuses]
        with self._lock:
            return [self._estimate(s, checkpoint, nbytes) for s in statuses]

    def _estimate(self, status: NodeStatus, checkpoint: str, nbytes: int) -> StartupEstimate:
        node = status.node_id
        tier: LoadTier = "registry"
        spb = self._spb(node, "registry")
        # The first fastest in TIERS order, as min() over tiers_holding() picks it.
        if checkpoint in status.disk and (d := self._spb(node, "disk")) <= spb:
            tier, spb = "disk", d
        if checkpoint in status.dram and (d := self._spb(node, "dram")) <= spb:
            tier, spb = "dram", d
        load = nbytes * spb + self._node_overhead(node)
        return StartupEstimate(node, tier, self._queue_wait(node) if self._queues.get(node) else 0.0, load)

    def calibration(self, node: str) -> tuple[float | None, float | None]:
        """The node's own registry seconds per byte and build overhead, None where it has
        none yet (the prior; every node's average). Two nodes with equal calibrations and
        empty loading queues get equal estimates for a checkpoint neither holds."""
        with self._lock:
            return self._s_per_byte.get((node, "registry")), self._overhead.get(node)

    def download_estimates(
        self, calibrations: Sequence[tuple[float | None, float | None]], nbytes: int
    ) -> list[float]:
        """estimate().total_s of a node with each calibration, an empty loading queue and
        not the checkpoint: a download, computed as _estimate computes it (same float)."""
        with self._lock:
            prior, shared = 1.0 / self._priors["registry"], self._any_overhead
            return [
                nbytes * (prior if spb is None else spb) + (shared if overhead is None else overhead)
                for spb, overhead in calibrations
            ]

    def loading(self, node: str) -> bool:
        """Whether a load is queued or running on `node` (its estimates then wait)."""
        with self._lock:
            return bool(self._queues.get(node))

    def queue_end(self, node: str) -> float:
        """Clock time `node`'s loading queue should be empty by its estimates: its queue
        wait at time t is at least queue_end - t (more once its running load overran).
        Placement indexes loading nodes by it; it changes only when a load begins,
        finishes or is cancelled there."""
        with self._lock:
            queue = self._queues.get(node)
            if not queue:
                return self.clock()
            head = queue[0].head_since
            return (self.clock() if head is None else head) + sum(p.estimate.load_s for p in queue)

    def queue_wait(self, node: str) -> float:
        """Seconds until `node`'s loading queue is free, by the estimates of its loads."""
        with self._lock:
            return self._queue_wait(node)

    def _queue_wait(self, node: str) -> float:
        now = self.clock()
        wait = 0.0
        for p in self._queues.get(node, []):
            if p.head_since is not None:
                wait += max(0.0, p.estimate.load_s - (now - p.head_since))
            else:
                wait += p.estimate.load_s
        return wait

    # -- the loads themselves ---------------------------------------------------------

    def begin(self, estimate: StartupEstimate) -> int:
        """A load placed on estimate.node joins its queue; returns a token for finish()."""
        with self._lock:
            now = self.clock()
            queue = self._queues.setdefault(estimate.node, [])
            token = next(self._tokens)
            self._token_node[token] = estimate.node
            queue.append(_Pending(token, estimate, now, now if not queue else None))
            return token

    def finish(self, token: int, info: InstanceInfo) -> Observation:
        """The load is done: leave the queue, recalibrate the tier's bandwidth and the
        node's overhead from what it measured, and return estimate vs actual."""
        with self._lock:
            pending = self._pop(token)
            node, tier = info.node, info.tier
            if info.nbytes >= MIN_BANDWIDTH_SAMPLE_BYTES:
                observed = max(info.load_s, 1e-9) / info.nbytes
                key = (node, tier)
                self._s_per_byte[key] = (1 - self.alpha) * self._spb(node, tier) + self.alpha * observed
            overhead = max(0.0, info.startup_s - info.load_s)
            a = self.alpha
            self._overhead[node] = (1 - a) * self._node_overhead(node) + a * overhead
            self._any_overhead = (1 - a) * self._any_overhead + a * overhead
            estimated = pending.estimate.total_s if pending is not None else 0.0
            # From joining the queue to ready; at least what the node itself measured.
            waited = self.clock() - pending.begun if pending is not None else 0.0
            actual = max(waited, info.startup_s)
            return Observation(node, tier, info.nbytes, estimated, actual)

    def cancel(self, token: int) -> None:
        """A load that failed or was abandoned leaves its node's queue."""
        with self._lock:
            self._pop(token)

    def _pop(self, token: int) -> _Pending | None:
        now = self.clock()
        node = self._token_node.pop(token, None)
        if node is None:
            return None
        queue = self._queues[node]  # that node's queue only, not every node's
        for i, p in enumerate(queue):
            if p.token == token:
                del queue[i]
                if queue and queue[0].head_since is None:
                    queue[0].head_since = now
                return p
        return None

    def snapshot(self) -> dict[str, dict[str, float]]:
        """node -> {tier: bytes/s, "overhead_s": s, "queue_s": s}, for status and metrics."""
        with self._lock:
            nodes = {n for n, _ in self._s_per_byte} | set(self._queues) | set(self._overhead)
            return {
                n: {
                    **{t: 1.0 / self._spb(n, t) for t in TIERS},
                    "overhead_s": self._node_overhead(n),
                    "queue_s": self._queue_wait(n),
                }
                for n in sorted(nodes)
            }
