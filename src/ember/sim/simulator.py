"""The discrete-event simulator: virtual time, a heap of events, the real control plane.

Decisions come from ember.cluster, imported and called as the controller calls them:
the placement policy (make_policy), StartupTimeEstimator (its clock the virtual clock;
every simulated load's InstanceInfo goes to finish(), so it recalibrates), Autoscaler
(scale-up, keep-alive, scale to zero), Router (pick / begin / end) and MigrationCost.
Physics (ember.sim.physics) says how long things take: loads from tier bandwidths,
inference from each model's latency model. An instance serves up to `max_batch`
requests at once, each at its own model's speed (prefill s/token, then decode s/step);
more wait at the instance, first come first served.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ember.bench.cluster_report import RequestOutcome
from ember.bench.cluster_workload import ClusterRequest
from ember.cluster import candidates
from ember.cluster.autoscaler import Autoscaler
from ember.cluster.candidates import Candidates
from ember.cluster.estimator import StartupTimeEstimator
from ember.cluster.messages import BandwidthProbe, InstanceInfo, LoadTier
from ember.cluster.migration_cost import MigrationCost
from ember.cluster.placement import IdleInstance, NodeView, Placement, RunningInstance, make_policy
from ember.cluster.router import Route, Router
from ember.cluster.state import Deployment
from ember.errors import InvalidRequestError
from ember.sim.config import ModelSpec, SimConfig
from ember.sim.physics import RegistryLink, SimServer

# remote-only+safetensors: remote-only placement whose starts download the checkpoint and
# then load it with a standard loader (ServerSpec.baseline_load_bps), as ServerlessLLM's
# Ray Serve and KServe baselines do; plain remote-only loads with Ember's own loader.
SAFETENSORS = "remote-only+safetensors"
POLICIES = (
    "startup-time-aware", "random", "round-robin", "remote-only",
    "startup-time-aware-no-migration", SAFETENSORS,
)  # fmt: skip


@dataclass
class _Request:
    index: int
    req: ClusterRequest
    instance: str | None = None  # the instance serving it (it moves with a migration)
    start_tier: LoadTier | None = None
    waited_for_slot: bool = False
    ttft_s: float | None = None
    e2e_s: float | None = None
    timed_out: bool = False
    paced_at: float = math.inf  # virtual time its second token comes: from then its pace is known
    done_at: float = math.inf


@dataclass
class _Instance:
    id: str
    model: ModelSpec
    server: SimServer
    tier: LoadTier
    token: int  # the estimator's token for its load
    delayed: bool  # its placement waited for a slot
    active: dict[int, _Request] = field(default_factory=dict)  # being served, by request index
    queue: deque[_Request] = field(default_factory=deque)
    migrating_to: str | None = None  # an instance loading elsewhere to take its requests
    source: str | None = None  # for a migration's destination: the instance it replaces


class Simulator:
    """One policy over one workload; run() returns the outcomes in request order."""

    def __init__(self, config: SimConfig, policy: str, *, seed: int = 0) -> None:
        if policy not in POLICIES:
            raise InvalidRequestError(
                f"unknown policy {policy!r} (one of {', '.join(POLICIES)})", param="policies"
            )
        self.config = config
        self.now = 0.0
        self.clock: Callable[[], float] = lambda: self.now
        self.estimator = StartupTimeEstimator(clock=self.clock)
        self.cost = MigrationCost(config.migration_s_per_token, config.migration_fixed_s)
        migrate = policy == "startup-time-aware"
        base = "startup-time-aware" if policy.startswith("startup-time-aware") else policy
        self.standard_loader = policy == SAFETENSORS
        base = "remote-only" if self.standard_loader else base
        self.policy = make_policy(
            base, self.estimator, migration=self.cost if migrate else None, rng=random.Random(seed)
        )
        self.link = RegistryLink(config.registry_link_bps) if config.registry_link_bps > 0 else None
        self.router = Router(clock=self.clock)
        self.autoscaler = Autoscaler(clock=self.clock)
        self.servers = {
            f"s{i:05d}": SimServer.make(f"s{i:05d}", config.server) for i in range(config.servers)
        }
        for s in self.servers.values():  # what a node's bandwidth probe would report
            bps = {"dram": s.spec.dram_bps, "disk": s.spec.ssd_bps, "registry": s.spec.network_bps}
            self.estimator.calibrate(BandwidthProbe(s.node_id, bps))
        # which servers hold what, have room, are loading: placement shortlists from it
        self.candidates = Candidates(self.estimator, [s.status() for s in self.servers.values()])
        # a cluster this small is shown to placement whole: the index is not asked, nor kept
        self._indexed = config.servers > candidates.FEW_NODES
        # server -> its free slots plus those of its instances with nothing in flight (the
        # most a start could have there), and how many servers have each such count
        self._total_of = {n: s.free for n, s in self.servers.items()}
        self._totals: Counter[int] = Counter(self._total_of.values())
        self.models = {m.name: m for m in config.models}
        self.deployments = {
            m.name: Deployment(m.name, m.name, 0, config.max_instances, config.max_batch, config.keep_alive_s)
            for m in config.models
        }
        self.instances: dict[str, _Instance] = {}
        self.waiting: dict[str, dict[int, _Request]] = {}  # deployment -> requests with no instance
        self.pending: dict[str, list[bool]] = {}  # deployment -> its unplaced starts (delayed yet?)
        # deployment -> the instance it is migrating away to make room: its start waits for
        # that hand-over rather than placing again meanwhile (as Instances.place does)
        self.committed: dict[str, str] = {}
        self.starts: dict[str, int] = {}
        self.migrations = 0
        self.reclaims = 0
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()

    # -- the event loop ---------------------------------------------------------------

    def at(self, when: float, action: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action, args))

    def run(self, workload: Sequence[ClusterRequest]) -> list[RequestOutcome]:
        requests = [_Request(i, r) for i, r in enumerate(workload)]
        for r in requests:
            if r.req.model not in self.models:
                raise InvalidRequestError(f"the trace asks for model {r.req.model!r}, not in the config")
        for r in requests:
            self.at(r.req.arrival_s, self._arrive, r)
        while self._events:
            when, _, action, args = heapq.heappop(self._events)
            self.now = when
            action(*args)
        return [self._outcome(r) for r in requests]

    def _outcome(self, r: _Request) -> RequestOutcome:
        return RequestOutcome(
            r.req.model, r.req.arrival_s, r.ttft_s, r.e2e_s, r.start_tier, r.waited_for_slot, r.timed_out
        )

    # -- requests ---------------------------------------------------------------------

    def _arrive(self, r: _Request) -> None:
        name = r.req.model
        route = self.router.pick(name)
        if route is not None:
            self._assign(self.instances[route.instance_id], r)
        else:
            self.waiting.setdefault(name, {})[r.index] = r
            self.at(self.now + self.config.start_timeout_s, self._time_out, r)
        self._scale(name)

    def _assign(self, inst: _Instance, r: _Request) -> None:
        route = self.router.get(inst.id)
        assert route is not None
        self.router.begin(route, r.req.prompt_tokens + r.req.output_tokens)
        if route.in_flight == 1:  # it was idle
            self._touch(inst.server, idle_only=True)
        r.instance = inst.id
        if len(inst.active) < self.config.max_batch:
            self._serve(inst, r)
        else:
            inst.queue.append(r)

    def _serve(self, inst: _Instance, r: _Request) -> None:
        inst.active[r.index] = r
        m = inst.model
        first = self.now + m.prefill_s_per_token * r.req.prompt_tokens
        r.ttft_s = first - r.req.arrival_s
        done = first + m.decode_s_per_step * r.req.output_tokens
        r.e2e_s = done - r.req.arrival_s
        r.paced_at, r.done_at = first + m.decode_s_per_step, done
        self.at(done, self._finish, r)

    def _finish(self, r: _Request) -> None:
        assert r.instance is not None
        inst = self.instances[r.instance]
        route = self.router.get(inst.id)
        assert route is not None
        self.router.end(route)
        del inst.active[r.index]
        if inst.queue:
            self._serve(inst, inst.queue.popleft())
        if route.in_flight == 0:
            self._touch(inst.server, idle_only=True)
            self._went_idle(route.deployment)

    def _time_out(self, r: _Request) -> None:
        waiting = self.waiting.get(r.req.model, {})
        if waiting.pop(r.index, None) is not None:
            r.timed_out = True

    # -- scaling and placement --------------------------------------------------------

    def _scale(self, name: str) -> None:
        """The autoscaler's plan for `name`, applied: starts placed, idle instances stopped."""
        dep = self.deployments[name]
        pending = self.pending.setdefault(name, [])
        plan = self.autoscaler.plan(
            dep, self.router.loads(name), len(self.waiting.get(name, ())), starting=len(pending)
        )
        pending.extend([False] * plan.start)
        for instance_id in plan.stop:
            self._stop(self.instances[instance_id])
        self._place(name)
        if not pending:
            del self.pending[name]

    def _place(self, name: str) -> None:
        """Place the pending starts of `name` while the policy finds room."""
        pending = self.pending.get(name, [])
        model = self.models[name]
        while pending and name not in self.committed:
            p = candidates.place(self.policy, self.candidates, name, model.nbytes, model.slots, self._view_of)
            for victim in p.reclaim if p is not None and p.action == "start" else ():
                self.reclaims += 1  # an idle instance gives its slots to this start
                self._stop(self.instances[victim])
            if p is None or p.action != "start":
                pending[0] = True  # this start waits for a slot
                if p is not None and p.action == "wait":
                    self.at(self.now + p.wait_s, self._retry, name)
                elif p is not None and p.action == "migrate":
                    self._migrate(name, p)
                return
            self._start(name, p, delayed=pending.pop(0))

    def _retry(self, name: str | None = None) -> None:
        """A slot may have freed (or an instance gone idle): try every deployment's
        pending starts, oldest first, skipping those no server has room for yet, free or
        idle (their wait timers still fire)."""
        if name is not None:
            if name in self.pending:
                self._scale(name)
            return
        room = self._room()
        for n in list(self.pending):
            if n in self.pending and self.models[n].slots <= room:
                self._scale(n)
                room = self._room()

    def _view_of(self, node: str) -> NodeView:
        return self._view(self.servers[node])

    def _room(self) -> int:
        """The most slots a start could have on one server: free ones plus idle instances'."""
        return max(self._totals)

    def _touch(self, server: SimServer, *, idle_only: bool = False) -> None:
        """`server` changed (a slot, a cache, a load, an instance gone idle or busy): index
        it again, with the slots of the idle instances its view offers. `idle_only`:
        nothing changed but which instances are idle."""
        spare = offered = 0
        for route in self.router.on_node(server.node_id):
            if route.ready and route.in_flight == 0:
                inst = self.instances[route.instance_id]
                spare += inst.model.slots
                if self._indexed and self._offered(route, inst):
                    offered += inst.model.slots
        if self._indexed and idle_only:
            self.candidates.set_idle(server.node_id, offered)
        elif self._indexed:
            self.candidates.update(server.status(), offered)
        before = self._total_of[server.node_id]
        self._totals[before] -= 1
        if not self._totals[before]:
            del self._totals[before]
        self._total_of[server.node_id] = server.free + spare
        self._totals[server.free + spare] += 1

    def _offered(self, route: Route, inst: _Instance) -> bool:
        """An instance with nothing in flight that a start may stop, as _view offers it
        (the simulator's deployments keep no min_instances, so whether one is offered
        changes only with its own server, which _touch then indexes again)."""
        dep = self.deployments[route.deployment]
        return (
            inst.migrating_to is None
            and inst.source is None
            and len(self.router.routes(route.deployment)) > dep.min_instances
        )

    def _view(self, server: SimServer) -> NodeView:
        """The node as Instances.view() shows it to placement: its busy instances (which
        a migration may move) and its idle ones (which a start may stop, longest idle
        first; a deployment keeps its min_instances)."""
        if server.free == server.spec.gpus:  # no instance there: nothing but its status
            return server.idle_view()
        running: list[RunningInstance] = []
        idle: list[tuple[float, IdleInstance]] = []
        for route in self.router.on_node(server.node_id):
            inst = self.instances[route.instance_id]
            if not route.ready or inst.migrating_to is not None or inst.source is not None:
                continue
            if route.in_flight > 0:
                tokens = route.max_tokens_in_flight
                m = inst.model
                running.append(
                    RunningInstance(inst.id, m.name, m.nbytes, tokens, m.slots, self._idle_in(inst))
                )
            elif self._offered(route, inst):
                idle.append((route.idle_since or 0.0, IdleInstance(inst.id, inst.model.slots)))
        idle.sort(key=lambda pair: pair[0])
        return NodeView(server.status(), tuple(running), idle=tuple(i for _, i in idle))

    def _idle_in(self, inst: _Instance) -> float:
        """RunningInstance.idle_in_s as the real relays estimate it: known once each of
        its requests has streamed two tokens (they run to their max_tokens here)."""
        if inst.queue or any(r.paced_at > self.now for r in inst.active.values()):
            return math.inf
        return max((r.done_at - self.now for r in inst.active.values()), default=math.inf)

    def _start(self, name: str, p: Placement, *, delayed: bool, source: _Instance | None = None) -> _Instance:
        server = self.servers[p.node]
        model = self.models[name]
        server.take(model.slots)
        inst_id = f"i{next(self._ids):08d}"
        self.router.add(inst_id, name, server.node_id)
        tier = server.tier_of(name, cold=p.cold)
        token = self.estimator.begin(p.estimate)
        load_s, ready_at = server.queue_load(
            self.now, tier, model.nbytes, standard=self.standard_loader, link=self.link
        )
        self._touch(server)  # a slot taken, a load queued
        inst = _Instance(inst_id, model, server, tier, token, delayed, source=source.id if source else None)
        self.instances[inst_id] = inst
        self.starts[tier] = self.starts.get(tier, 0) + 1
        self.at(ready_at, self._ready, inst, load_s, self.now)
        return inst

    def _ready(self, inst: _Instance, load_s: float, began: float) -> None:
        m, server = inst.model, inst.server
        startup_s = load_s + server.spec.overhead_s
        info = InstanceInfo(
            inst.id, m.name, m.name, server.node_id, inst.tier, m.nbytes, load_s, startup_s, 4096
        )
        self.estimator.finish(inst.token, info)
        server.loaded(m.name, m.nbytes, inst.tier)
        self._touch(server)  # its caches, its queue, its calibration
        if inst.source is not None:  # a migration's destination: hand the requests over
            src_route = self.router.get(inst.source)  # None: it stopped meanwhile
            tokens = 0 if src_route is None else src_route.max_tokens_in_flight
            self.at(self.now + self.cost.seconds(tokens), self._handover, inst)
            return
        self.router.set_ready(inst.id)
        self._touch(server)  # an instance with nothing in flight yet
        self._drain_waiting(inst)

    def _drain_waiting(self, inst: _Instance) -> None:
        waiting = self.waiting.pop(inst.model.name, {})
        for r in waiting.values():
            r.start_tier, r.waited_for_slot = inst.tier, inst.delayed
            route = self.router.pick(inst.model.name)
            assert route is not None
            self._assign(self.instances[route.instance_id], r)
        self._scale(inst.model.name)
        route = self.router.get(inst.id)
        if route is not None and route.in_flight == 0:
            self._went_idle(inst.model.name)

    def _went_idle(self, name: str) -> None:
        """An instance of `name` has nothing in flight: its keep-alive runs from now, and a
        start waiting for a slot may take its slots at once (as Instances.place wakes
        when a request ends)."""
        self.at(self.now + self.config.keep_alive_s, self._scale, name)
        if self.pending:
            self.at(self.now, self._retry)

    def _stop(self, inst: _Instance) -> None:
        self.router.remove(inst.id)
        inst.server.give_back(inst.model.slots)
        self._touch(inst.server)
        self.at(self.now, self._retry)

    # -- live migration ---------------------------------------------------------------

    def _migrate(self, name: str, p: Placement) -> None:
        """Placement chose to move a running instance away so a start of `name` can use
        its node; that start waits for the hand-over."""
        assert p.migrate_instance is not None and p.migrate_to is not None
        victim = self.instances.get(p.migrate_instance)
        if victim is None or victim.migrating_to is not None:
            return
        dest = self.servers[p.migrate_to]
        est = self.estimator.estimate(dest.status(), victim.model.name, victim.model.nbytes)
        move = Placement("start", dest.node_id, est.tier, est.total_s, est)
        new = self._start(victim.model.name, move, delayed=False, source=victim)
        victim.migrating_to = new.id
        self._touch(victim.server)  # not offered as idle any more
        self.migrations += 1
        self.committed[name] = victim.id

    def _handover(self, new: _Instance) -> None:
        """The destination recomputed the tokens so far: its source's requests continue
        there (their token streams go on: completion times are unchanged) and the source
        instance stops, freeing its slots."""
        assert new.source is not None
        src = self.instances.get(new.source)
        for name in [n for n, source in self.committed.items() if source == new.source]:
            del self.committed[name]  # its start places again once the source has gone
            self.at(self.now, self._retry, name)
        new.source = None
        self.router.set_ready(new.id)
        src_route = self.router.get(src.id) if src is not None else None
        if src is not None and src_route is not None:
            new_route = self.router.get(new.id)
            assert new_route is not None
            for r in [*src.active.values(), *src.queue]:
                self.router.end(src_route)
                self.router.begin(new_route, r.req.prompt_tokens + r.req.output_tokens)
                r.instance = new.id
            new.active, new.queue = src.active, src.queue
            src.active, src.queue = {}, deque()
            self._stop(src)
        self._touch(new.server)  # ready, with its source's requests
        self._drain_waiting(new)
