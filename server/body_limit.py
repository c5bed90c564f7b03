"""Request body size limit (413 in OpenAI's shape), for both apps.

A declared Content-Length over the limit is refused before a byte of the body is read;
a chunked body is counted as it arrives and refused as soon as it passes the limit.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLargeError


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, setting: str = "--max-request-bytes"):
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting

    def message(self, size: int | None) -> str:
        seen = f"{size} bytes" if size is not None else "more"
        return f"request body of {seen}; the limit is {self.max_bytes} bytes ({self.setting})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _refuse(send, self.message(declared))
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes an HTTPException raised while reading the body through;
                    # the app's handler renders it in OpenAI's shape with this status.
                    raise HTTPException(PayloadTooLargeError.status_code, self.message(None))
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Send, message: str) -> None:
    body = json.dumps(PayloadTooLargeError(message).body()).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
