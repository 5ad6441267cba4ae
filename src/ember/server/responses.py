"""OpenAI response bodies and stream chunks, built from Generation state as the models
of server/response_models.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ember.engine.request import FinishReason, TokenLogprobs
from ember.errors import EmberError
from ember.server.response_models import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from ember.server.serving import Choice, Generation, error_body, new_id, sse


def _completion_logprobs(lps: list[TokenLogprobs], text_start: int = 0) -> CompletionLogprobs:
    offsets, pos = [], text_start
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.chosen.token)
    return CompletionLogprobs(
        tokens=[lp.chosen.token for lp in lps],
        token_logprobs=[lp.chosen.logprob for lp in lps],
        top_logprobs=[{t.token: t.logprob for t in lp.top} for lp in lps],
        text_offset=offsets,
    )


def _chat_logprobs(lps: list[TokenLogprobs]) -> ChatLogprobs:
    def top(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    content = [
        TokenLogprob(
            **top(lp.chosen.token, lp.chosen.logprob).model_dump(),
            top_logprobs=[top(t.token, t.logprob) for t in lp.top],
        )
        for lp in lps
    ]
    return ChatLogprobs(content=content, refusal=None)


def _wants_logprobs(choice: Choice) -> bool:
    return choice.request.sampling_params.logprobs


def _usage(gen: Generation) -> Usage:
    return Usage(**gen.usage())


async def completion(gen: Generation, model: str) -> Completion:
    async for _ in gen.deltas():
        pass
    choices = [
        CompletionChoice(
            index=c.index,
            text="".join(c.text),
            logprobs=_completion_logprobs(c.logprobs) if _wants_logprobs(c) else None,
            finish_reason=c.finish_reason,
        )
        for c in gen.choices
    ]
    return Completion(
        id=new_id("cmpl"), created=int(time.time()), model=model, choices=choices, usage=_usage(gen)
    )


async def chat_completion(gen: Generation, model: str) -> ChatCompletion:
    async for _ in gen.deltas():
        pass
    choices = [
        ChatChoice(
            index=c.index,
            message=ChatCompletionMessage(content="".join(c.text)),
            logprobs=_chat_logprobs(c.logprobs) if _wants_logprobs(c) else None,
            finish_reason=c.finish_reason,
        )
        for c in gen.choices
    ]
    return ChatCompletion(
        id=new_id("chatcmpl"), created=int(time.time()), model=model, choices=choices, usage=_usage(gen)
    )


def _event(chunk: CompletionChunk | ChatCompletionChunk, include_usage: bool) -> str:
    # `usage` is a key of every chunk (null but on the last) only when it was asked for.
    return sse(chunk.model_dump(mode="json", exclude=None if include_usage else {"usage"}))


async def completion_stream(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    cid, created = new_id("cmpl"), int(time.time())
    try:
        async for choice, delta in gen.deltas():
            out = delta.outputs[0]
            if not out.text and not delta.finished:
                continue
            lps = out.logprobs or []
            body = CompletionChoice(
                index=choice.index,
                text=out.text,
                logprobs=_completion_logprobs(lps) if _wants_logprobs(choice) else None,
                finish_reason=choice.finish_reason if delta.finished else None,
            )
            chunk = CompletionChunk(id=cid, created=created, model=model, choices=[body])
            yield _event(chunk, include_usage)
    except EmberError as exc:
        yield sse(error_body(exc))
    else:
        if include_usage:
            last = CompletionChunk(id=cid, created=created, model=model, choices=[], usage=_usage(gen))
            yield _event(last, include_usage)
    yield sse("[DONE]")


async def chat_stream(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    cid, created = new_id("chatcmpl"), int(time.time())

    def chunk(
        index: int, delta: ChatDelta, finish: FinishReason | None, logprobs: ChatLogprobs | None = None
    ) -> str:
        body = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
        return _event(
            ChatCompletionChunk(id=cid, created=created, model=model, choices=[body]), include_usage
        )

    for c in gen.choices:
        yield chunk(c.index, ChatDelta(role="assistant", content=""), None)
    try:
        async for choice, delta in gen.deltas():
            out = delta.outputs[0]
            if out.text or out.logprobs:
                lps = _chat_logprobs(out.logprobs or []) if _wants_logprobs(choice) else None
                yield chunk(choice.index, ChatDelta(content=out.text), None, lps)
            if delta.finished:
                yield chunk(choice.index, ChatDelta(), choice.finish_reason)
    except EmberError as exc:
        yield sse(error_body(exc))
    else:
        if include_usage:
            last = ChatCompletionChunk(id=cid, created=created, model=model, choices=[], usage=_usage(gen))
            yield _event(last, include_usage)
    yield sse("[DONE]")
