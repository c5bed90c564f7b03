"""server/body_limit.py on a bare ASGI app: a declared Content-Length over the limit is a
413 in OpenAI's shape before the app runs or a byte is read; a chunked body is counted as
it arrives and stopped as it passes the limit; what is within it, and what is not HTTP,
passes through untouched. (Over a real server: tests/integration/test_serve_hardening.py.)"""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.exceptions import HTTPException

from server.body_limit import BodySizeLimit

LIMIT = 10


class App:
    """Reads the whole body, as a route would, then answers 200 with its length."""

    def __init__(self) -> None:
        self.called = False

    async def __call__(self, scope, receive, send) -> None:
        self.called = True
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})


def call(chunks: list[bytes], length: int | str | None = None, scope_type: str = "http"):
    """Run the limit around App on `chunks`: the app, what was sent, how many chunks were read."""
    app, sent = App(), []
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    reads = iter(messages)

    async def receive():
        return next(reads)

    async def send(message):
        sent.append(message)

    scope = {"type": scope_type, "path": "/v1/completions", "headers": headers}
    asyncio.run(BodySizeLimit(app, LIMIT)(scope, receive, send))
    return app, sent, len(messages) - sum(1 for _ in reads)


def test_a_declared_length_over_the_limit_is_refused_before_the_app_runs():
    app, sent, read = call([b"x" * 11], length=11)
    assert not app.called and read == 0
    assert sent[0]["status"] == 413 and (b"connection", b"close") in sent[0]["headers"]
    error = json.loads(sent[1]["body"])["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "payload_too_large"
    assert error["message"] == "request body of 11 bytes; the limit is 10 bytes (--max-request-bytes)"


def test_a_chunked_body_is_stopped_as_it_passes_the_limit():
    with pytest.raises(HTTPException) as raised:
        call([b"x" * 6, b"x" * 6, b"x" * 6])
    assert raised.value.status_code == 413
    assert raised.value.detail == "request body of more; the limit is 10 bytes (--max-request-bytes)"


def test_a_body_within_the_limit_and_what_is_not_http_pass_through():
    app, sent, read = call([b"x" * 5, b"x" * 5], length=10)
    assert app.called and read == 2 and sent[-1]["body"] == b"10"
    app, sent, _ = call([b"x" * 5, b"x" * 5])  # chunked, no declared length
    assert sent[-1]["body"] == b"10"
    app, sent, read = call([b"x" * 99], length=99, scope_type="websocket")
    assert app.called and not sent and read == 0


def test_an_unreadable_content_length_is_counted_as_it_arrives():
    with pytest.raises(HTTPException):
        call([b"x" * 11], length="lots")
    app, sent, _ = call([b"x" * 3], length="lots")
    assert sent[-1]["body"] == b"3"
