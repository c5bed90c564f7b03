"""Our OpenAPI document, made to tell the truth about what the server answers.

FastAPI documents a 422 `HTTPValidationError` on every route with input; this server
never sends one. Every failure leaves in OpenAI's error shape (server/errors.py) with the
status it really has: 400 bad input, 401 bad key (on the protected prefix, when keys are
configured), 404 unknown model or no shadow path, 413 body too large, 503 model not
loaded yet. /metrics is Prometheus text, /health a small `{"status": ...}` object, and the
two completion routes answer JSON or, with `"stream": true`, server-sent events.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.protocol import ChatCompletionResponse, CompletionResponse
from server.serving.validation import RequestValidator

REF = "#/components/schemas/{model}"

ERROR_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "title": "Error",
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string", "description": "invalid_request_error, not_found_error, service_unavailable, ..."},
            "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["message", "type", "param", "code"],
    },
    "ErrorResponse": {
        "type": "object",
        "title": "ErrorResponse",
        "description": "OpenAI's error shape, used for every failure.",
        "properties": {"error": {"$ref": "#/components/schemas/Error"}},
        "required": ["error"],
    },
    "HealthStatus": {
        "type": "object",
        "title": "HealthStatus",
        "properties": {"status": {"type": "string", "description": "`ok`, `loading`, or why loading failed"}},
        "required": ["status"],
    },
}

ERROR_DESCRIPTIONS = {
    "400": "Invalid request (malformed JSON, a wrong type or range, an unsupported feature, too long a prompt)",
    "401": "Missing or invalid API key",
    "404": "Not found (no such model; for /v1/shadow/verdict: the shadow path is off)",
    "413": "Request body too large",
    "503": "The model is not loaded (yet)",
}

# One server-sent event: its `data` is a JSON chunk (or an error body), the last one `[DONE]`.
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string", "description": "a JSON chunk, an ErrorResponse, or [DONE]"}},
    "required": ["data"],
}

# Routes that stream server-sent events when the request says `"stream": true`.
STREAMING: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionResponse,
    "/v1/completions": CompletionResponse,
}


def _error(status: str, descriptions: dict[str, str]) -> dict:
    return {
        "description": descriptions[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }


def _takes_model(op: dict, schemas: dict) -> bool:
    if any(p.get("in") == "path" and p.get("name") == "model" for p in op.get("parameters", [])):
        return True
    body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
    refs = [body.get("$ref", "")] + [branch.get("$ref", "") for branch in body.get("anyOf", [])]
    return any("model" in schemas.get(ref.rsplit("/", 1)[-1], {}).get("properties", {}) for ref in refs)


def _bound(node: dict, keyword: str, value: int) -> None:
    """`keyword: value` wherever it applies in a property's schema (its anyOf branches):
    `maximum` on integers, `maxLength` on strings (an array's items too), `maxItems` on a
    batch (an array of prompts, not one prompt's token ids)."""
    kind = node.get("type")
    if (keyword, kind) in (("maximum", "integer"), ("maxLength", "string")):
        node[keyword] = value
    if keyword == "maxItems" and kind == "array" and node.get("items", {}).get("type") in ("string", "array"):
        node[keyword] = value
    if keyword == "maxLength" and kind == "array":
        _bound(node.get("items", {}), keyword, value)
    for branch in node.get("anyOf", []):
        _bound(branch, keyword, value)


# Request fields bounded by one of the validator's limits (server/serving/validation.py):
# per limit, the JSON Schema keyword and its (schema, property) pairs. Only bounds the
# schema states exactly: a chat message's character count is its text parts' joined, so
# only a string `content` gets a maxLength.
LIMITED: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "max_n": ("maximum", [("ChatCompletionRequest", "n"), ("CompletionRequest", "n")]),
    "max_logprobs": ("maximum", [("ChatCompletionRequest", "top_logprobs"), ("CompletionRequest", "logprobs"),
                                 ("CompletionRequest", "prompt_logprobs")]),
    "max_message_chars": ("maxLength", [("ChatMessage", "content"), ("CompletionRequest", "prompt"),
                                        ("TokenizeRequest", "prompt")]),
    "max_prompts": ("maxItems", [("CompletionRequest", "prompt")]),
    "max_stop_chars": ("maxLength", [("ChatCompletionRequest", "stop"), ("CompletionRequest", "stop")]),
}


def _document_limits(schemas: dict, validator: RequestValidator) -> dict[str, str]:
    """The validator's limits as the request schemas' bounds; the error descriptions, the body's limit in the 413's."""
    for limit, (keyword, fields) in LIMITED.items():
        for schema_name, prop in fields:
            properties = schemas.get(schema_name, {}).get("properties", {})
            if prop in properties:
                properties[prop] = copy.deepcopy(properties[prop])  # never a schema object shared with another
                _bound(properties[prop], keyword, getattr(validator, limit))
    return {**ERROR_DESCRIPTIONS,
            "413": f"Request body over {validator.max_request_bytes} bytes (--max-request-bytes)"}


def rewrite(
    doc: dict,
    *,
    protected_prefix: str | tuple[str, ...] = "/v1/",
    auth: bool = False,
    validator: RequestValidator | None = None,
    always_up: tuple[str, ...] = ("/health", "/metrics"),
    not_found_paths: tuple[str, ...] = ("/v1/shadow/verdict",),
    streaming: dict[str, type[BaseModel]] | None = None,
) -> dict:
    """Post-process FastAPI's generated document in place (and return it)."""
    streaming = STREAMING if streaming is None else streaming
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(ERROR_SCHEMAS)
    if streaming:
        _, defs = models_json_schema([(m, "serialization") for m in streaming.values()], ref_template=REF)
        schemas.update(defs.get("$defs", {}))
    descriptions = ERROR_DESCRIPTIONS if validator is None else _document_limits(schemas, validator)
    if auth:
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer", "description": "one of the server's --api-keys",
        }

    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path == "/health":
                ok = {"application/json": {"schema": {"$ref": "#/components/schemas/HealthStatus"}}}
                responses["200"] = {"description": "The model is loaded", "content": ok}
                responses["503"] = {"description": "Loading, or loading failed", "content": ok}
                continue
            if path == "/metrics":
                responses["200"] = {
                    "description": "Prometheus text exposition",
                    "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                }
                continue
            if path in streaming and method == "post":
                name = streaming[path].__name__
                responses["200"] = {
                    "description": f"A {name}; with `\"stream\": true`, server-sent events: one JSON chunk "
                    "per `data:` line, then `data: [DONE]`",
                    "content": {
                        "application/json": {"schema": {"$ref": REF.format(model=name)}},
                        "text/event-stream": {"schema": SSE_EVENT},
                    },
                }
            statuses = []
            has_query = any(p.get("in") == "query" for p in op.get("parameters", []))
            if "requestBody" in op or has_query:
                statuses.append("400")
            if auth and path.startswith(protected_prefix):
                statuses.append("401")
                op["security"] = [{"bearer": []}]
            if path in not_found_paths or _takes_model(op, schemas):
                statuses.append("404")
            if method == "post":
                statuses.append("413")
            if path not in always_up:
                statuses.append("503")
            for status in statuses:
                responses[status] = _error(status, descriptions)
    return doc


def install_openapi(
    app: FastAPI, *, protected_prefix: str | tuple[str, ...] = "/v1/", auth: bool = False, **options: Any
) -> None:
    """Serve the rewritten document from `app.openapi()` (and so /openapi.json and /docs).
    `auth`: API keys are configured, so routes under `protected_prefix` may answer 401;
    `validator` (an option): the server's request limits, documented as the request
    schemas' bounds (server/serving/validation.py)."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                summary=app.summary,
                description=app.description,
                routes=app.routes,
                tags=app.openapi_tags,
                servers=app.servers,
            )
            app.openapi_schema = rewrite(doc, protected_prefix=protected_prefix, auth=auth, **options)
        return app.openapi_schema

    app.openapi = openapi
