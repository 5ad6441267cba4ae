"""A request's place among the server's requests in flight, held until its response ends.

The server counts a request from admission (the `--max-in-flight` check) until its
response has ended, however it ends: a body sent, an error before or after the first
byte, a client gone before the first byte (Starlette then never starts a streaming
body, so a count kept inside the body would never come down). Leaving the slot
happens once: it gives the place back and closes the request's generation, which
aborts its engine requests. `ember:server_requests_in_flight` shows the count.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ember.errors import EmberError, InternalError
from ember.server.serving import error_body, sse

log = logging.getLogger(__name__)


class Slot:
    """One request in flight. `release` gives its place back; `close` (set once the
    request has a generation) ends whatever still runs for it."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release
        self.close: Callable[[], Awaitable[None]] | None = None

    async def leave(self) -> None:
        """Give the place back (at once, before any await) and close the generation;
        later calls do nothing."""
        release, self._release = self._release, None
        if release is None:
            return
        release()
        if self.close is not None:
            await self.close()


def internal_error(exc: Exception) -> EmberError:
    """An unexpected error (a bug) while serving a request, as the request's error."""
    if isinstance(exc, EmberError):
        return exc
    log.error("a request failed: %s", exc, exc_info=exc)
    return InternalError(f"the server failed while serving this request: {type(exc).__name__}: {exc}")


class SlotStream(StreamingResponse):
    """A server-sent event stream that holds its request's slot until the response ends.

    An error the body raises after the first byte becomes an error event and `[DONE]`,
    as the OpenAI API ends a failed stream; the slot is left before the last byte, so a
    client that has read `[DONE]` finds the request no longer counted."""

    def __init__(self, body: AsyncIterator[str], slot: Slot) -> None:
        self._body = body
        self._slot = slot
        super().__init__(self._guarded(), media_type="text/event-stream")

    async def _guarded(self) -> AsyncIterator[str]:
        try:
            async for chunk in self._body:
                yield chunk
        except Exception as exc:
            yield sse(error_body(internal_error(exc)))
            yield sse("[DONE]")
        finally:
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:  # a body left part-way (the client went away)
                with contextlib.suppress(Exception):
                    await aclose()
            await self._slot.leave()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # the body never started (the client left first), or stopped part-way
            await self._slot.leave()
