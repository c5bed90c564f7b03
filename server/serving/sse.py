"""Server-sent events as OpenAI and vLLM stream them: `data: {json}` then a blank line
per event, a final `data: [DONE]`, no comments, no keep-alive pings.

A plain Starlette StreamingResponse, as vLLM's own server uses: one ASGI send per event
and nothing else per token. (sse-starlette, used before, opened an anyio cancel scope
around every send and ran two watcher tasks per stream.) Starlette cancels the stream
when the client disconnects; the event iterator (and what it reads from) is then closed
under a shield, so its cleanup (aborting the engine requests) runs at once, not when it
is collected: on every exit, a response whose first send failed included.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Send

from server.errors import APIError

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
CLEANUP_S = 5.0  # at most this long for the iterator's cleanup after a failed send


def frame(payload: str) -> bytes:
    return b"data: " + payload.encode() + b"\n\n"


class EventStream(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[BaseModel], upstream: AsyncIterator | None = None):
        """`upstream`: what `events` reads from, closed too: an events generator that never
        ran (the client gone before the first send) runs none of its own cleanup."""
        self._closing = [it for it in (events, upstream) if hasattr(it, "aclose")]
        # no-cache: proxies must not store it; X-Accel-Buffering: nginx (ingress) must
        # pass each event through at once instead of buffering the response.
        super().__init__(_frames(events), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        except BaseException:  # client gone (cancelled, OSError) or a send that failed
            with anyio.move_on_after(CLEANUP_S, shield=True):
                await self.body_iterator.aclose()
                for iterator in self._closing:  # closed by the frames' own cleanup if they ran; else here
                    await iterator.aclose()
            raise


async def _frames(events: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    """Each event framed; an error after the stream started is sent as an error event
    (the status line is already out), then the stream ends normally."""
    try:
        async for event in events:
            yield frame(event.model_dump_json())
    except APIError as exc:
        yield frame(json.dumps(exc.body()))
    except Exception:
        log.exception("stream failed")
        yield frame(json.dumps(APIError("internal server error").body()))
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    yield DONE
