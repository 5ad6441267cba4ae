"""OpenAI-compatible request bodies, validated with pydantic.

Fields Ember accepts are declared; a field Ember does not implement (tools,
response_format with a schema, ...) or does not know is refused with a 400 that
names it, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ember.engine.request import SEED_MAX, SEED_MIN
from ember.errors import InvalidRequestError, UnsupportedFeatureError

# Fields of the OpenAI API that Ember knows but does not implement.
_UNSUPPORTED = {
    "tools": "tool calling",
    "tool_choice": "tool calling",
    "functions": "function calling",
    "function_call": "function calling",
    "parallel_tool_calls": "tool calling",
    "suffix": "suffix insertion",
    "audio": "audio output",
    "modalities": "non-text modalities",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
}
# Fields accepted and ignored because they change nothing for a self-hosted server.
_IGNORED = {"user", "metadata", "store", "service_tier", "reasoning_effort", "stream_options"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None  # signed 64 bits, as OpenAI's
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _refuse_unknown(self) -> _Base:
        for name in self.model_extra or {}:
            if name in _UNSUPPORTED:
                raise UnsupportedFeatureError(
                    f"'{name}' ({_UNSUPPORTED[name]}) is not supported by Ember", param=name
                )
            if name not in _IGNORED:
                raise InvalidRequestError(f"unknown field '{name}'", param=name)
        return self

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key in v or {}:
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Base):
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    best_of: int | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.echo:
            raise UnsupportedFeatureError("'echo' is not supported by Ember", param="echo")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedFeatureError("'best_of' other than n is not supported by Ember", param="best_of")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidRequestError("'prompt' must not be empty", param="prompt")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise UnsupportedFeatureError(
                    f"message content of type {part.get('type')!r} is not supported (text only)",
                    param="messages",
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(_Base):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.response_format is not None and self.response_format.type != "text":
            raise UnsupportedFeatureError(
                f"response_format {self.response_format.type!r} is not supported by Ember (only 'text')",
                param="response_format",
            )
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]
