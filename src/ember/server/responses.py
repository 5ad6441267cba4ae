"""OpenAI response bodies and stream chunks, built from Generation state."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from ember.engine.request import TokenLogprobs
from ember.errors import EmberError
from ember.server.serving import Choice, Generation, error_body, new_id, sse


def _completion_logprobs(lps: list[TokenLogprobs], text_start: int = 0) -> dict[str, Any]:
    offsets, pos = [], text_start
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.chosen.token)
    return {
        "tokens": [lp.chosen.token for lp in lps],
        "token_logprobs": [lp.chosen.logprob for lp in lps],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _chat_logprobs(lps: list[TokenLogprobs]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {
                **entry(lp.chosen.token, lp.chosen.logprob),
                "top_logprobs": [entry(t.token, t.logprob) for t in lp.top],
            }
            for lp in lps
        ]
    }


def _wants_logprobs(choice: Choice) -> bool:
    return choice.request.sampling_params.logprobs


async def completion(gen: Generation, model: str) -> dict[str, Any]:
    async for _ in gen.deltas():
        pass
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c.index,
                "text": "".join(c.text),
                "logprobs": _completion_logprobs(c.logprobs) if _wants_logprobs(c) else None,
                "finish_reason": c.finish_reason,
            }
            for c in gen.choices
        ],
        "usage": gen.usage(),
    }


async def chat_completion(gen: Generation, model: str) -> dict[str, Any]:
    async for _ in gen.deltas():
        pass
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": _chat_logprobs(c.logprobs) if _wants_logprobs(c) else None,
                "finish_reason": c.finish_reason,
            }
            for c in gen.choices
        ],
        "usage": gen.usage(),
    }


async def completion_stream(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model}
    usage_field = {"usage": None} if include_usage else {}
    try:
        async for choice, delta in gen.deltas():
            out = delta.outputs[0]
            if not out.text and not delta.finished:
                continue
            lps = out.logprobs or []
            body = {
                "index": choice.index,
                "text": out.text,
                "logprobs": _completion_logprobs(lps) if _wants_logprobs(choice) else None,
                "finish_reason": choice.finish_reason if delta.finished else None,
            }
            yield sse({**head, "choices": [body], **usage_field})
    except EmberError as exc:
        yield sse(error_body(exc))
    else:
        if include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
    yield sse("[DONE]")


async def chat_stream(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[str]:
    head = {
        "id": new_id("chatcmpl"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    usage_field = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None, logprobs: Any = None) -> str:
        body = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**head, "choices": [body], **usage_field})

    for c in gen.choices:
        yield chunk(c.index, {"role": "assistant", "content": ""}, None)
    try:
        async for choice, delta in gen.deltas():
            out = delta.outputs[0]
            if out.text or out.logprobs:
                lps = _chat_logprobs(out.logprobs or []) if _wants_logprobs(choice) else None
                yield chunk(choice.index, {"content": out.text}, None, lps)
            if delta.finished:
                yield chunk(choice.index, {}, choice.finish_reason)
    except EmberError as exc:
        yield sse(error_body(exc))
    else:
        if include_usage:
            yield sse({**head, "choices": [], "usage": gen.usage()})
    yield sse("[DONE]")
