"""Relay: one request being served, a stream the controller can move between instances.

The relay knows the request (prompt, sampling parameters) and every token it has
delivered to the client, so whichever instance serves it, the client sees one
stream: no token lost, none repeated.

- Live migration (ember.cluster.migration) parks the request's tokens on the
  destination, then calls `hand_over`: the source stops the request (its snapshot
  carries the sampler state), the relay reads the source's last deltas and
  continues from the destination's parked cache. If the destination fails before
  its first token, the relay resumes on the source from the snapshot.
- A node that fails (NodeFailedError from its stream, or `interrupt` when the
  controller marks it down) sends the relay to another instance (`RelayHost.failover`),
  resuming from the delivered tokens. A request that samples continues exactly there
  too: it carries a seed (the client's, or one drawn when it was admitted: see
  EngineRequest), and its sampler state is rebuilt from the seed and the number of
  tokens drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from ember.cluster.router import Route
from ember.cluster.runtime import NodeRuntime
from ember.engine.request import EngineRequest, RequestOutput, RequestSnapshot
from ember.engine.sampler import state_after
from ember.errors import EmberError, NodeFailedError

log = logging.getLogger(__name__)

MAX_FAILOVERS = 4  # instances one request may try after failures before its client sees the error


class RelayHost(Protocol):
    """What a relay asks of the controller."""

    def node(self, route: Route) -> NodeRuntime:
        """The runtime of the node `route` is on (NodeFailedError if it is down)."""
        ...

    def attach(self, relay: Relay, route: Route) -> None:
        """The relay is now served by `route` (counted in flight there)."""
        ...

    async def detach(self, relay: Relay, route: Route) -> None:
        """The relay left `route`."""
        ...

    def node_failed(self, route: Route, error: NodeFailedError) -> None:
        """The node of `route` failed while serving a relay: mark it down."""
        ...

    async def failover(self, relay: Relay, failed: Route, error: NodeFailedError) -> Route:
        """Another instance of the deployment for a request whose instance failed;
        NodeFailedError if none can take it."""
        ...


@dataclass
class _Handover:
    dest: Route
    snapshot: asyncio.Future[RequestSnapshot]
    settled: asyncio.Future[bool]  # True once the destination streamed, False if it fell back


STALLED_STEPS = 4


class Pace:
    """How fast a request's tokens come: the time and count of its first delta and the
    time and count of its latest."""

    def __init__(self) -> None:
        self._first: tuple[float, int] | None = None
        self._last: tuple[float, int] | None = None

    def delivered(self, tokens: int, now: float) -> None:
        """`tokens` delivered in all, the latest at `now`."""
        if self._first is None:
            self._first = (now, tokens)
        self._last = (now, tokens)

    def seconds_for(self, tokens: int, now: float) -> float:
        """Seconds until `tokens` more have come at this pace, counted from the latest
        delta; inf until two deltas have given a pace, and while the request is silent
        for more than STALLED_STEPS of its tokens' time (preempted, held: its pace says
        nothing then)."""
        if self._first is None or self._last is None or self._last[1] <= self._first[1]:
            return math.inf
        (t0, n0), (t1, n1) = self._first, self._last
        per_token = (t1 - t0) / (n1 - n0)
        if now - t1 > STALLED_STEPS * per_token:
            return math.inf
        return max(0.0, tokens * per_token - (now - t1))


class Relay:
    """A request in flight; `stream()` yields its deltas from whichever instance serves it."""

    def __init__(self, request: EngineRequest, route: Route, host: RelayHost) -> None:
        self.request = request
        self.route = route
        self.host = host
        self.delivered: list[int] = []  # output tokens the client has been sent
        self.pace = Pace()
        self.active = False  # streaming, not finished or closed
        self._handover: _Handover | None = None
        self._kill: asyncio.Future[None] | None = None  # set by interrupt(): stop reading now

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        """Prompt + output tokens delivered so far."""
        return len(self.request.prompt_token_ids) + len(self.delivered)

    @property
    def remaining(self) -> int:
        """Output tokens the request may still produce."""
        return self.request.sampling_params.max_tokens - len(self.delivered)

    def idle_in_s(self, now: float) -> float:
        """Seconds until it has produced its max_tokens at the pace of its deltas so far
        (time.monotonic() clock); inf until two deltas have given a pace."""
        return self.pace.seconds_for(self.remaining, now)

    def park_request(self) -> EngineRequest:
        """The request with its tokens so far, for a destination to park (prewarm)."""
        return self._resumed(park=True)

    def interrupt(self, error: BaseException) -> None:
        """Stop reading the current instance's stream (its node is down): fail over."""
        if self._kill is not None and not self._kill.done():
            self._kill.set_exception(error)
            self._kill.exception()  # retrieved: no warning if nobody reads it

    # -- the stream ---------------------------------------------------------------------

    async def stream(self) -> AsyncGenerator[RequestOutput, None]:
        """The request's deltas, across hand-overs and fail-overs, until it finishes."""
        self.active = True
        self.host.attach(self, self.route)
        request, failures = self.request, 0
        fallback: tuple[Route, RequestSnapshot] | None = None  # the source, until the destination streams
        try:
            while True:
                route = self.route
                try:
                    async for delta in self._read(route, request):
                        fallback = None
                        yield delta
                        if delta.finished:
                            return
                    # the source stopped the request for a hand-over: continue on the destination
                    request, fallback = await self._take_handover()
                except Exception as e:
                    failures += 1
                    node_failed = isinstance(e, NodeFailedError | _StreamBroken)
                    if not (node_failed or fallback is not None):
                        raise
                    if failures > MAX_FAILOVERS:
                        raise _as_node_failure(e, route) from e
                    request = await self._recover(route, e, fallback)
                    fallback = None
        finally:
            self.active = False
            self._settle(False)
            await self.host.detach(self, self.route)

    async def _read(self, route: Route, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """Deltas of `request` on `route` that the client gets; ends without one when
        the source stopped the request for a hand-over."""
        self._kill = asyncio.get_running_loop().create_future()
        stream = self.host.node(route).generate(route.instance_id, request)
        it = aiter(stream)
        try:
            while True:
                delta = await self._next(it)
                if delta is None:
                    raise _StreamBroken(f"the stream of {self.request_id} on {route.node} ended early")
                out = delta.outputs[0]
                handover = self._handover
                if (
                    delta.finished
                    and out.finish_reason == "abort"
                    and handover
                    and handover.dest is not route
                ):
                    return
                self.delivered += out.token_ids
                self.pace.delivered(len(self.delivered), time.monotonic())
                if self._handover is not None and self._handover.dest is route:
                    self._settle(True)
                yield delta
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()  # the node aborts a request left unfinished

    async def _next(self, it: AsyncIterator[RequestOutput]) -> RequestOutput | None:
        """The next delta, None at the stream's end; the interrupt's error if that comes first."""
        kill = self._kill
        assert kill is not None
        if kill.done():
            kill.result()
        step: asyncio.Future[RequestOutput] = asyncio.ensure_future(anext(it))
        try:
            waiters: list[asyncio.Future[Any]] = [step, kill]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step
        if not step.done() or step.cancelled():
            kill.result()  # raises the interrupt's error
        try:
            return step.result()
        except StopAsyncIteration:
            return None

    # -- moving ------------------------------------------------------------------------

    async def hand_over(self, source: NodeRuntime, route: Route, dest: Route, wait_s: float) -> bool:
        """Stop the request on `route` (on node `source`) and continue it on `dest`, where
        its tokens were parked. True once `dest` streamed; False if the request ended
        first, was no longer on `route`, or went back there because `dest` failed. Waits
        at most `wait_s` for the destination's first token (then True: not known failed)."""
        if not self.active or self._handover is not None or self.route is not route:
            return False
        loop = asyncio.get_running_loop()
        handover = _Handover(dest, loop.create_future(), loop.create_future())
        self._handover = handover
        try:
            snapshot = await source.abort(route.instance_id, self.request_id)
        except BaseException as e:
            self._handover = None
            if not handover.snapshot.done():  # a relay waiting for it fails over instead
                handover.snapshot.set_exception(_as_node_failure(e, route))
                handover.snapshot.exception()
            raise
        if snapshot is None:  # it finished (or failed) before the stop
            self._handover = None
            return False
        handover.snapshot.set_result(snapshot)
        try:
            return await asyncio.wait_for(asyncio.shield(handover.settled), wait_s)
        except TimeoutError:
            return True

    async def _take_handover(self) -> tuple[EngineRequest, tuple[Route, RequestSnapshot]]:
        handover = self._handover
        assert handover is not None
        snapshot = await handover.snapshot
        source = self.route
        if list(snapshot.output_token_ids) != self.delivered:  # cannot happen: deltas come in order
            log.error("hand-over of %s: the snapshot does not match what was streamed", self.request_id)
        await self._move(handover.dest)
        return self._resumed(snapshot), (source, snapshot)

    async def _recover(
        self, failed: Route, error: BaseException, fallback: tuple[Route, RequestSnapshot] | None
    ) -> EngineRequest:
        """After the instance serving the relay failed: the request resumed on the source
        of a hand-over that has not streamed yet, else on another instance."""
        self._settle(False)
        if isinstance(error, NodeFailedError | _StreamBroken):
            self.host.node_failed(failed, _as_node_failure(error, failed))
        if fallback is not None:
            source, snapshot = fallback
            log.warning("destination of %s failed (%s); back to its source", self.request_id, error)
            with contextlib.suppress(NodeFailedError):
                self.host.node(source)  # raises if the source's node is down too
                await self._move(source)
                return self._resumed(snapshot)
        log.warning("request %s: its instance on %s failed (%s); resuming elsewhere", self.request_id,
                    failed.node, error)  # fmt: skip
        await self._move(await self.host.failover(self, failed, _as_node_failure(error, failed)))
        return self._resumed()

    async def _move(self, route: Route) -> None:
        old, self.route = self.route, route
        self.host.attach(self, route)
        await self.host.detach(self, old)

    def _settle(self, ok: bool) -> None:
        """The hand-over in progress is over: the destination streamed (ok) or not."""
        handover, self._handover = self._handover, None
        if handover is not None and not handover.settled.done():
            handover.settled.set_result(ok)

    def _resumed(self, snapshot: RequestSnapshot | None = None, *, park: bool = False) -> EngineRequest:
        """The request continued from the delivered tokens: sampler state from the
        source's snapshot when it matches them, else rebuilt from the seed (every
        sampling request has one: the snapshot's sampling_params carry the same)."""
        p = self.request.sampling_params
        state = None
        if snapshot is not None and list(snapshot.output_token_ids) == self.delivered:
            state = snapshot.sampler_state
        elif p.seed is not None and not p.greedy and self.delivered and not park:
            state = state_after(p.seed, len(self.delivered))
        return EngineRequest.make(
            self.request_id, self.request.prompt_token_ids, p, prompt=self.request.prompt,
            output_token_ids=self.delivered, sampler_state=state, park=park,
        )  # fmt: skip


class _StreamBroken(EmberError):
    """A node's stream ended without a finished delta (its node went away)."""


def _as_node_failure(error: BaseException, route: Route) -> NodeFailedError:
    if isinstance(error, NodeFailedError):
        return error
    return NodeFailedError(f"node {route.node} failed while serving the request: {error}", node=route.node)
