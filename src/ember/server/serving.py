"""The OpenAI completions and chat completions endpoints over a ModelBackend.

A request becomes one EngineRequest per prompt and per choice (n); their deltas
are merged into one response, or streamed as server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from ember.backend import ModelBackend, ModelInfo
from ember.engine.request import (
    EngineRequest,
    FinishReason,
    RequestOutput,
    SamplingParams,
    TokenLogprobs,
    offset_seed,
)
from ember.errors import EmberError, InvalidRequestError
from ember.server.metrics import ServerMetrics
from ember.server.protocol import ChatCompletionRequest, CompletionRequest
from ember.server.response_models import ErrorDetail, ErrorResponse

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; chat defaults to the remaining context


@dataclass
class Choice:
    """One choice being generated: its request and what came back so far."""

    index: int
    request: EngineRequest
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    if isinstance(req, ChatCompletionRequest):
        logprobs, top = req.logprobs, req.top_logprobs or 0
    else:
        logprobs, top = req.logprobs is not None, req.logprobs or 0
    # top_p 0 (OpenAI accepts it) keeps only the most likely token: greedy decoding.
    greedy = req.top_p == 0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if greedy else 1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None or greedy else req.top_p,
        top_k=0 if req.top_k in (None, -1) else req.top_k,
        seed=req.seed,
        stop=tuple(req.stop_list()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
    )


def _token_ids(info: ModelInfo, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return list(info.tokenizer.encode(prompt))
    return prompt


def _max_tokens(requested: int | None, prompt_len: int, info: ModelInfo, default: int | None) -> int:
    room = info.max_model_len - prompt_len
    if room <= 0:
        raise InvalidRequestError(
            f"the prompt is {prompt_len} tokens; this model's context is {info.max_model_len}",
            param="messages" if default is None else "prompt",
        )
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise InvalidRequestError(
            f"max_tokens ({requested}) plus the prompt ({prompt_len} tokens) exceeds the "
            f"model's context of {info.max_model_len} tokens",
            param="max_tokens",
        )
    return requested


def build_choices(
    req: CompletionRequest | ChatCompletionRequest, info: ModelInfo, request_id: str
) -> list[Choice]:
    """One EngineRequest per (prompt, choice); seeds differ per choice."""
    if isinstance(req, ChatCompletionRequest):
        try:
            ids = info.tokenizer.apply_chat_template(req.chat(), add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a template that rejects these messages
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        prompts: list[list[int]] = [list(ids)]
        limit, default = req.token_limit, None
    else:
        prompts = [_token_ids(info, p) for p in req.prompts()]
        limit, default = req.max_tokens, DEFAULT_MAX_TOKENS
    choices = []
    for p_index, ids in enumerate(prompts):
        params = sampling_params(req, _max_tokens(limit, len(ids), info, default))
        for c in range(req.n):
            seed = None if req.seed is None else offset_seed(req.seed, c)
            choice_params = params if c == 0 else replace(params, seed=seed)
            index = p_index * req.n + c
            choices.append(Choice(index, EngineRequest.make(f"{request_id}-{index}", ids, choice_params)))
    return choices


class Generation:
    """Runs a request's choices concurrently and merges their deltas in arrival order."""

    def __init__(
        self, backend: ModelBackend, model: str, choices: list[Choice], n: int, metrics: ServerMetrics
    ) -> None:
        self.backend = backend
        self.model = model
        self.choices = choices
        self.n = n
        self.metrics = metrics
        self.arrival = time.monotonic()
        self._started: AsyncGenerator[tuple[Choice, RequestOutput]] | None = None
        self._first: tuple[Choice, RequestOutput] | None = None
        self._pumps: list[asyncio.Task[None]] = []  # one per choice, reading its backend stream

    async def start(self) -> None:
        """Wait for the first delta, so that what can fail before any token (no
        instance in time, a refused request) fails before a streaming response's 200."""
        self._started = self._run()
        try:
            self._first = await anext(self._started)
        except StopAsyncIteration:
            self._first = None

    async def deltas(self) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Every (choice, delta) as it arrives, after start()'s first one if it ran."""
        if self._started is None:
            self._started = self._run()
        elif self._first is not None:
            yield self._first
        run = self._started
        try:
            async for item in run:
                yield item
        finally:
            await run.aclose()  # stops the choices' streams

    async def _run(self) -> AsyncGenerator[tuple[Choice, RequestOutput]]:
        queue: asyncio.Queue[tuple[Choice, RequestOutput] | BaseException | None] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            try:
                async for delta in self.backend.generate(self.model, choice.request):
                    queue.put_nowait((choice, delta))
            except BaseException as exc:  # forwarded to the consumer
                queue.put_nowait(exc)
                return
            queue.put_nowait(None)

        tasks = self._pumps = [asyncio.create_task(pump(c)) for c in self.choices]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                self._record(*item)
                yield item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """End every choice's backend stream now, however far the generation got (its
        engine requests are aborted and free their KV blocks); once they ended, a no-op.
        Safe while a consumer still waits for deltas (it gets the cancellation)."""
        for task in self._pumps:
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)

    def _record(self, choice: Choice, delta: RequestOutput) -> None:
        out = delta.outputs[0]
        now = time.monotonic()
        if out.token_ids:
            labels = self.metrics.itl.labels(self.model)
            if choice.first_token_at is None:
                choice.first_token_at = now
                self.metrics.ttft.labels(self.model).observe(now - self.arrival)
            elif choice.last_token_at is not None:
                for _ in out.token_ids:
                    labels.observe((now - choice.last_token_at) / len(out.token_ids))
            choice.last_token_at = now
        choice.text.append(out.text)
        choice.token_ids += out.token_ids
        choice.logprobs += out.logprobs or []
        if delta.finished:
            choice.finish_reason = out.finish_reason or "stop"
            self._finish(choice, delta)

    def _finish(self, choice: Choice, delta: RequestOutput) -> None:
        m = self.metrics
        m.e2e.labels(self.model).observe(time.monotonic() - self.arrival)
        m.prompt_tokens.labels(self.model).inc(len(choice.request.prompt_token_ids))
        m.generation_tokens.labels(self.model).inc(len(choice.token_ids))
        m.requests.labels(self.model, choice.finish_reason or "stop").inc()
        metrics = delta.metrics
        if metrics is not None and metrics.first_scheduled_time is not None:
            m.queue.labels(self.model).observe(max(0.0, metrics.first_scheduled_time - metrics.arrival_time))

    def usage(self) -> dict[str, int]:
        # Each prompt counts once, however many choices (n) it has.
        prompt = sum(len(c.request.prompt_token_ids) for c in self.choices if c.index % self.n == 0)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict[str, Any] | str) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n"


def error_body(exc: EmberError) -> dict[str, Any]:
    """An error in OpenAI's shape, for a response or a stream's last event. The client
    reads `exc.public` (no server paths, registry URLs or credentials); when the
    whole text says more, the log keeps it."""
    public = exc.public
    if str(exc) != public:
        log.warning("%d %s: %s", exc.status, exc.type, exc)
    detail = ErrorDetail(message=public, type=exc.type, param=exc.param, code=exc.status)
    return ErrorResponse(error=detail).model_dump(mode="json")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
