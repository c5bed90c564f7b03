"""Typed API errors, each naming its HTTP status, rendered in OpenAI's error shape.

`{"error": {"message", "type", "param", "code"}}` for every failure, so the official
client raises its matching exception (BadRequestError, AuthenticationError, ...).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


class InvalidRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(APIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class ServiceUnavailableError(APIError):
    status_code = 503
    type = "service_unavailable"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "function-", "tagged-union", "json-or-python")


def _param(loc: tuple) -> str | None:
    """`body.messages.0.content.list[TextPart].0` -> `messages.0.content.0`: drop where the
    value came from (body, query) and the union-branch tags pydantic adds to locations."""
    parts = [
        str(part) for n, part in enumerate(loc)
        if not (n == 0 and part in ("body", "query")) and not (isinstance(part, str) and part.startswith(_TYPE_TAGS))
    ]
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    if any(e.get("type") == "json_invalid" for e in errors):
        return "request body is not valid JSON", None
    # An explicit check of ours says more than "input should be a valid string" from
    # the other branch of a union.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    param = _param(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error shape, never as a bare 500 traceback."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "payload_too_large" if exc.status_code == 413 else None
        return JSONResponse(
            error_body(str(exc.detail), type_, None, code), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)


class PayloadTooLargeError(APIError):
    """413: the request (its body, or the tokens it asks to score) is over a configured limit."""

    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class ConflictError(APIError):
    """409: the request names something the server holds in another form (an adapter's
    name bound to other weights)."""

    status_code = 409
    type = "invalid_request_error"
