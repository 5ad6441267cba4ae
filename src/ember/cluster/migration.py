"""LiveMigration: move an instance's running requests to another instance, by tokens.

ServerlessLLM's live migration (SYSTEM.md section 2): the destination instance is
already started. For every request in flight on the source, concurrently (so the
destination batches their recomputation):
1. park the request's tokens so far (prompt + outputs) on the destination, which
   recomputes their KV cache while the source keeps generating;
2. repeat with the tokens generated meanwhile until the gap is at most `gap_tokens`
   (or `max_rounds` rounds ran);
3. hand over (Relay.hand_over): the source stops the request, the relay continues it
   from the destination's parked cache with the source's sampler state.
A destination that fails at any point leaves the request on the source (or sends it
back there from the snapshot). Every round's recomputation time calibrates the
MigrationCost that placement weighs migrations with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ember.cluster.migration_cost import MigrationCost
from ember.cluster.relay import Relay
from ember.cluster.router import Route
from ember.cluster.runtime import NodeRuntime
from ember.errors import NodeFailedError

log = logging.getLogger(__name__)

Outcome = Literal["moved", "stayed", "finished"]


@dataclass(frozen=True)
class MigrationConfig:
    max_rounds: int = 4  # rounds of parking before the hand-over, whatever the gap
    gap_tokens: int = 2  # hand over once the destination lags by at most this many tokens
    timeout_s: float = 60.0  # bound on each round and on the wait for the destination's first token


@dataclass(frozen=True)
class MigrationReport:
    moved: int  # requests now served by the destination
    stayed: int  # requests left on the source (the destination failed)
    finished: int  # requests that ended before their hand-over
    dest_error: NodeFailedError | None = None  # the destination's node failed

    @property
    def complete(self) -> bool:
        """Nothing is left running on the source."""
        return self.stayed == 0


class LiveMigration:
    """Moves relays from the instance `source_route` (on node `source`) to the instance
    `dest` (on node `dest_node`)."""

    def __init__(
        self,
        source: NodeRuntime,
        source_route: Route,
        dest_node: NodeRuntime,
        dest: Route,
        cost: MigrationCost,
        config: MigrationConfig | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.source = source
        self.source_route = source_route
        self.dest_node = dest_node
        self.dest = dest
        self.cost = cost
        self.config = config or MigrationConfig()
        self.clock = clock
        self._dest_error: NodeFailedError | None = None

    async def move(self, relays: Sequence[Relay]) -> MigrationReport:
        """Move every relay; each one's outcome is independent of the others'."""
        self._dest_error = None
        outcomes = await asyncio.gather(*(self._move(r) for r in relays))
        return MigrationReport(
            outcomes.count("moved"), outcomes.count("stayed"), outcomes.count("finished"), self._dest_error
        )

    async def _move(self, relay: Relay) -> Outcome:
        cfg = self.config
        parked = 0
        try:
            for _ in range(cfg.max_rounds):
                if not relay.active or relay.remaining <= cfg.gap_tokens:
                    return "finished" if not relay.active else "stayed"
                tokens = relay.num_tokens
                if parked and tokens - parked <= cfg.gap_tokens:
                    break
                start = self.clock()
                await self._prewarm(relay)
                self.cost.observe(tokens - parked, self.clock() - start)
                parked = tokens
            if not relay.active:
                return "finished"
            if await relay.hand_over(self.source, self.source_route, self.dest, cfg.timeout_s):
                return "moved"
            outcome: Outcome = "stayed" if relay.active else "finished"
        except Exception as e:
            log.warning("migrating request %s to %s failed: %s", relay.request_id, self.dest.node, e)
            outcome = "stayed" if relay.active else "finished"
        with contextlib.suppress(Exception):  # free its parked cache, if the destination still lives
            await asyncio.wait_for(self.dest_node.abort(self.dest.instance_id, relay.request_id), 5.0)
        return outcome

    async def _prewarm(self, relay: Relay) -> None:
        request = relay.park_request()
        try:
            await asyncio.wait_for(
                self.dest_node.prewarm(self.dest.instance_id, request), self.config.timeout_s
            )
        except (NodeFailedError, TimeoutError) as e:  # the destination's node died or hangs
            if self._dest_error is None:
                message = f"node {self.dest.node} failed during a migration: {e or 'timed out'}"
                self._dest_error = e if isinstance(e, NodeFailedError) else NodeFailedError(message)
            raise
