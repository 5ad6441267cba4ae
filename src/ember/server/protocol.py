"""OpenAI-compatible request bodies, validated with pydantic.

What OpenAI accepts, Ember accepts, unless ignoring it would change the output
silently: a field Ember does not implement (tools, response_format with a schema, ...)
is refused with a 400 that names it, unless its value asks for nothing (`"tools": []`,
`"tool_choice": "none"`); a field that changes nothing here (`user`, `store`, ...) is
accepted and ignored; an unknown field is refused. An explicit null means "not
given", as in OpenAI's API. docs/serving.md lists the decisions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ember.engine.request import SEED_MAX, SEED_MIN
from ember.errors import InvalidRequestError, UnsupportedFeatureError

# Fields of the OpenAI API that Ember does not implement: what each is for, and the
# values that ask for nothing (accepted: ignoring them changes nothing). Any other
# value is refused.
_UNSUPPORTED: dict[str, tuple[str, list[Any]]] = {
    "tools": ("tool calling", [[]]),
    "tool_choice": ("tool calling", ["none", "auto"]),  # with no tools, "auto" calls none
    "functions": ("function calling", [[]]),
    "function_call": ("function calling", ["none", "auto"]),
    "suffix": ("suffix insertion", [""]),
    "audio": ("audio output", []),
    "modalities": ("non-text modalities", [["text"]]),
    "prediction": ("predicted outputs", []),
    "web_search_options": ("web search", []),
    "moderation": ("moderation of the input and output", []),
}
# Fields accepted and ignored because they change nothing for a self-hosted server
# (or nothing without tools, which are refused: parallel_tool_calls).
_IGNORED = {
    "user", "metadata", "store", "service_tier", "reasoning_effort", "stream_options",
    "parallel_tool_calls", "verbosity", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options",
}  # fmt: skip


def _openapi_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """The JSON schema says what the validators do: an optional field may be null, the
    accepted values of an unimplemented field are listed, nothing else is allowed."""
    props: dict[str, Any] = schema.setdefault("properties", {})
    required = set(schema.get("required", ()))
    for name, prop in props.items():
        if name in required or any(p.get("type") == "null" for p in prop.get("anyOf", [prop])):
            continue
        meta = {k: prop.pop(k) for k in ("title", "default", "description") if k in prop}
        props[name] = {"anyOf": [prop, {"type": "null"}], **meta}
    if model.model_config.get("extra") == "allow":
        for name in sorted(_IGNORED - props.keys()):
            props[name] = {"description": "accepted and ignored"}
        for name, (feature, accepted) in _UNSUPPORTED.items():
            if accepted:
                props[name] = {"enum": [*accepted, None], "description": f"{feature}: not supported"}
        schema["additionalProperties"] = False


class _Body(BaseModel):
    model_config = ConfigDict(json_schema_extra=_openapi_schema)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Body):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool = True  # OpenAI pads chunks to hide their sizes; Ember does not


class _Base(_Body):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None  # 0: greedy
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
        for name, value in (self.model_extra or {}).items():
            if name in _UNSUPPORTED:
                feature, accepted = _UNSUPPORTED[name]
                if value in accepted:
                    continue
                raise UnsupportedFeatureError(f"'{name}' ({feature}) is not supported by Ember", param=name)
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


_Text = Annotated[str, Field(min_length=1)]
_TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# A string, a list of strings, a list of token ids or a list of such lists; none empty.
Prompt = (
    _Text
    | Annotated[list[_Text], Field(min_length=1)]
    | _TokenIds
    | Annotated[list[_TokenIds], Field(min_length=1)]
)


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
