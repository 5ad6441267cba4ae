"""AsyncEngine: the engine loop in a background thread, streams for asyncio servers.

Every change to the engine (add, abort) runs on the engine thread between two
iterations, so a request can be stopped or handed over at any token boundary.
Everything that crosses into the caller's event loop is a picklable dataclass.

No error leaves a request in flight: one raised while a request joins ends that
request, the requests an iteration's error ended (Engine.take_failed) end with it,
and should the thread itself die (an error the engine could not contain), every
request ends with EngineDeadError and later ones are refused with it (`failure`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from ember.engine.engine import Engine
from ember.engine.request import EngineRequest, RequestOutput, RequestSnapshot, SamplingParams
from ember.engine.validation import validate_request
from ember.errors import EmberError, EngineDeadError, InternalError, InvalidRequestError

log = logging.getLogger(__name__)

_Item = RequestOutput | BaseException
_STOP = object()
PARKED_POLL_S = 1.0


class RequestStream:
    """An async iterator of one request's RequestOutput deltas, ending after the one
    with `finished` set. Raises the request's error if the engine refused it."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._done = False

    def _push(self, item: _Item) -> None:  # from the engine thread
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody listens
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: queue.Queue[Callable[[], None] | object] = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._parking: dict[str, concurrent.futures.Future[int]] = {}  # prewarm() calls in flight
        self._lock = threading.Lock()
        self._closed = False  # shutdown() began: no new requests
        self._stopped = False  # the engine thread is gone: nothing queued would ever run
        self._dead: str | None = None  # why the engine thread died, if it did
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_checkpoint(cls, model: str | Path, scheduler: str = "mlfq", **engine_config: Any) -> AsyncEngine:
        """Load a checkpoint (store name or path) and start its engine thread."""
        from ember.engine.config import EngineConfig
        from ember.engine.loader import load_engine

        return cls(load_engine(model, EngineConfig(scheduler=scheduler, **engine_config)))

    @property
    def failure(self) -> EngineDeadError | None:
        """Why the engine thread died (an error it could not contain); None while it runs."""
        return None if self._dead is None else EngineDeadError(self._dead)

    def _refusal(self) -> EmberError:
        dead = self.failure
        return dead if dead is not None else EmberError("the engine is shut down")

    # -- the caller's side (event loop thread) ---------------------------------------

    def submit(self, request: EngineRequest) -> RequestStream:
        """Queue a request; returns its stream of deltas. Raises InvalidRequestError (or
        a subclass) at once for a request the engine cannot serve."""
        if self._closed:
            raise EmberError("the engine is shut down")
        validate_request(request, vocab_size=self.engine.vocab_size, max_model_len=self.engine.max_model_len)
        stream = RequestStream(request.request_id, asyncio.get_running_loop())
        with self._lock:
            if self._stopped:
                raise self._refusal()
            if request.request_id in self._streams or request.request_id in self._parking:
                raise InvalidRequestError(f"request id {request.request_id!r} is already running")
            self._streams[request.request_id] = stream
            self._commands.put(lambda: self._add(request))
        return stream

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """submit() as an async generator; a caller that stops early (a client that went
        away) aborts the request, which frees its KV blocks."""
        stream = self.submit(request)
        finished = False
        try:
            async for delta in stream:
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    await self.abort(request.request_id)

    def resume(
        self,
        prompt_token_ids: Sequence[int],
        output_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        sampler_state: bytes | None = None,
        *,
        request_id: str | None = None,
    ) -> RequestStream:
        """Continue a request from its tokens (live migration): recompute the KV cache of
        prompt + outputs, then stream only the tokens after them. With the source's
        sampler_state (or `sampler.state_after` of the request's seed) a request that
        samples continues exactly as it would have there."""
        return self.submit(
            EngineRequest.make(
                request_id or uuid.uuid4().hex,
                prompt_token_ids,
                sampling_params,
                output_token_ids=output_token_ids,
                sampler_state=sampler_state,
            )
        )

    async def prewarm(self, request: EngineRequest) -> int:
        """Compute the KV cache of the request's prompt + outputs and park it under its
        id without sampling (live migration, while the source still generates); the
        number of tokens cached. Called again with more tokens, only the new ones are
        computed; submit()/resume() with the same id continues from the parked cache.
        abort() frees it; so does the engine once it was parked unused for a minute."""
        if self._closed:
            raise EmberError("the engine is shut down")
        request = dataclasses.replace(request, park=True)
        validate_request(request, vocab_size=self.engine.vocab_size, max_model_len=self.engine.max_model_len)
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        with self._lock:
            if self._stopped:
                raise self._refusal()
            if request.request_id in self._streams or request.request_id in self._parking:
                raise InvalidRequestError(f"request id {request.request_id!r} is already running")
            self._parking[request.request_id] = future
            self._commands.put(lambda: self._add(request))
        return await asyncio.wrap_future(future)

    async def abort(self, request_id: str) -> RequestSnapshot | None:
        """Stop a request and free its KV blocks. Its stream ends with finish_reason
        "abort"; the snapshot (tokens and sampler state) lets resume() continue it."""
        future: concurrent.futures.Future[RequestSnapshot | None] = concurrent.futures.Future()

        def command() -> None:
            # The caller may have given up waiting (its task was cancelled, which
            # cancels this future); the abort itself must still happen.
            wanted = future.set_running_or_notify_cancel()
            try:
                result = self.engine.abort(request_id)
            except Exception as e:  # the request ends anyway, and its caller hears why
                self._fail(request_id, _internal(e, "aborting this request"))
                if wanted:
                    future.set_exception(e)
                raise
            self._fail_parking(request_id, EmberError(f"request {request_id!r} was aborted"))
            if result is not None:
                self._deliver(result[0])
            if wanted:
                future.set_result(None if result is None else result[1])

        with self._lock:
            if self._stopped:  # shut down: its requests already ended
                return None
            self._commands.put(command)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop the engine thread (pending requests end with an error). Commands queued
        before the thread stopped still run here (an abort's caller gets its answer);
        later ones are refused."""
        if self._closed:
            return
        self._closed = True
        self._commands.put(_STOP)
        self._thread.join()
        with self._lock:
            self._stopped = True
            left = self._take_commands()
        self._run_left(left)
        self._fail_all(EmberError("the engine was shut down"))
        try:
            self.engine.close()
        except Exception:
            if self._dead is None:
                raise
            log.exception("closing an engine whose thread died failed")

    def _take_commands(self) -> list[Callable[[], None] | object]:
        left = []
        with contextlib.suppress(queue.Empty):
            while True:
                left.append(self._commands.get_nowait())
        return left

    @staticmethod
    def _run_left(left: list[Callable[[], None] | object]) -> None:
        """Run the commands queued before the thread stopped (an abort's caller gets its
        answer; a request waiting to join is not added: it ends with the others)."""
        for command in left:
            if callable(command):
                try:
                    command()
                except Exception:
                    log.exception("engine command failed")

    # -- the engine thread --------------------------------------------------------------

    def _add(self, request: EngineRequest) -> None:
        if self._stopped:  # queued before a shutdown or the thread's death: ends with the others
            return
        try:
            self.engine.add_request(request)
        except Exception as e:  # the engine left nothing of it behind
            self._fail(request.request_id, _internal(e, "admitting this request"))

    def _deliver(self, output: RequestOutput) -> None:
        with self._lock:
            stream = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
        if stream is not None:
            stream._push(output)

    def _fail(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream._push(error)
        self._fail_parking(request_id, error)

    def _fail_parking(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            future = self._parking.pop(request_id, None)
        if future is not None:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # its caller gave up
                future.set_exception(error)

    def _parked(self) -> None:
        for request_id, tokens in self.engine.take_parked():
            with self._lock:
                future = self._parking.pop(request_id, None)
            if future is None:  # its caller gave up waiting: nobody will take it over
                self.engine.abort(request_id)
                continue
            try:
                future.set_result(tokens)
            except concurrent.futures.InvalidStateError:
                self.engine.abort(request_id)

    def _fail_all(self, error: BaseException, *, abort: bool = True) -> None:
        with self._lock:
            ids = list(self._streams) + list(self._parking)
        for request_id in ids:
            if abort:
                self.engine.abort(request_id)
            self._fail(request_id, error)

    def _run_commands(self, block: bool) -> bool:
        """Run queued commands; False once asked to stop. While sequences are parked a
        blocking wait wakes up every second, to free the ones parked too long."""
        try:
            timeout = PARKED_POLL_S if block and self.engine.num_parked else None
            command = self._commands.get(block=block, timeout=timeout)
            while True:
                if command is _STOP:
                    return False
                assert callable(command)
                try:
                    command()
                except Exception:  # one bad command must not end the engine thread
                    log.exception("engine command failed")
                command = self._commands.get_nowait()
        except queue.Empty:
            return True

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # an error the engine could not contain: its state is suspect
            log.critical("the engine thread died", exc_info=e)
            self._die(e)

    def _loop(self) -> None:
        while self._run_commands(block=not self.engine.has_unfinished()):
            self._parked()  # a prewarm that had nothing new to compute parks at once
            for request_id in self.engine.expire_parked():
                log.warning("parked request %s was never taken over; its cache is freed", request_id)
            if not self.engine.has_unfinished():
                continue
            outputs = self.engine.step()  # ends the requests its errors touch (take_failed)
            for output in outputs:
                self._deliver(output)
            for request_id, error in self.engine.take_failed():
                self._fail(request_id, error)
            self._parked()

    def _die(self, cause: BaseException) -> None:
        """The engine thread ends on `cause`: refuse new requests, answer the commands
        queued, and end every request with EngineDeadError (without touching the engine)."""
        message = f"the engine stopped after an unexpected error: {type(cause).__name__}: {cause}"
        with self._lock:
            self._dead = message
            self._stopped = True
            left = self._take_commands()
        self._run_left(left)
        self._fail_all(EngineDeadError(message), abort=False)


def _internal(error: Exception, doing: str) -> EmberError:
    """`error` as the request's error: an EmberError as it is, anything else (a bug) as
    an InternalError that says what the engine was doing."""
    if isinstance(error, EmberError):
        return error
    wrapped = InternalError(f"the engine failed {doing}: {type(error).__name__}: {error}")
    wrapped.__cause__ = error
    return wrapped
