"""What /openapi.json says of the API routes beyond what FastAPI infers: the request
bodies (which the routes parse themselves, with the body limit and Ember's error
messages), the streamed form of a response, and the errors."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from ember.server.response_models import ErrorResponse

_REF = "#/components/schemas/{model}"

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in [
        (400, "a bad field, malformed JSON"),
        (401, "a missing or wrong API key"),
        (404, "no such model"),
        (413, "the body is over the limit"),
        (503, "starting, stopping, or too many requests in flight (Retry-After)"),
    ]
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def streamed(chunk: type[BaseModel]) -> dict[str, Any]:
    """The 200 response's `text/event-stream` form (with `stream`): one event per chunk,
    whose data is a `chunk` as JSON (or an ErrorResponse, for an error after the first
    token), then `[DONE]`. Open API 3.1 reads `schema` as the schema of each event."""
    data = {
        "if": {"const": "[DONE]"},
        "else": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [_ref(chunk), _ref(ErrorResponse)]},
        },
    }
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {
        "description": f"the response; with `stream`, server-sent events: each a {chunk.__name__} "
        "as JSON, the last `[DONE]`",
        "content": {"text/event-stream": {"schema": event}},
    }


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that parses its body as `model` itself (read_body)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


def declare_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Put `models`' schemas (and those they use) into /openapi.json's components, which
    FastAPI fills only from the bodies it parses and the responses it serialises."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                body = model.model_json_schema(ref_template=_REF)
                components.update(body.pop("$defs", {}))
                components[model.__name__] = body
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
