"""The stream's wire format, as clients that parse SSE by hand read it: vLLM's own
`bench serve` client (its StreamedResponseHandler) loses every event after a comment
line until two events share one read — the usage chunk included. Its benchmark of this
server counted 19,944 output tokens for 32,768 generated while keep-alive pings were on."""

from __future__ import annotations

import asyncio
import json

from pydantic import BaseModel
from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler

from server.errors import InvalidRequestError
from server.serving.sse import EventStream


class Event(BaseModel):
    n: int


async def events(count: int, fail_at: int | None = None):
    for n in range(count):
        if n == fail_at:
            raise InvalidRequestError("bad at 2")
        yield Event(n=n)


def body_reads(stream) -> tuple[dict, list[bytes]]:
    """Each chunk the server sends, one per network read, through a real Starlette app."""
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    app = Starlette(routes=[Route("/stream", lambda request: EventStream(stream))])
    with TestClient(app) as client, client.stream("GET", "/stream") as reply:
        return dict(reply.headers), [chunk for chunk in reply.iter_raw() if chunk]


def test_vllms_bench_client_reads_every_event_and_done():
    headers, reads = body_reads(events(5))
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["x-accel-buffering"] == "no"  # nginx must not hold events back
    assert not any(r.lstrip().startswith(b":") for r in reads)  # no comments, no pings
    handler, received = StreamedResponseHandler(), []
    for chunk in reads:  # as the client does: each read stripped, then buffered
        for message in handler.add_chunk(chunk.strip()):
            received.append(message.removeprefix("data: "))
    assert received[-1] == "[DONE]"
    assert [json.loads(m)["n"] for m in received[:-1]] == [0, 1, 2, 3, 4]


def test_an_error_mid_stream_is_an_error_event_then_done():
    _, reads = body_reads(events(5, fail_at=2))
    body = b"".join(reads).decode()
    frames = [f.removeprefix("data: ") for f in body.split("\n\n") if f]
    assert [json.loads(f)["n"] for f in frames[:2]] == [0, 1]
    assert json.loads(frames[2])["error"]["message"] == "bad at 2"
    assert frames[3:] == ["[DONE]"]


def test_a_client_that_leaves_closes_the_event_iterator_at_once():
    """The iterator's cleanup aborts the engine requests: it must run when the send
    fails, not whenever the generator happens to be collected."""
    closed = asyncio.Event()

    async def endless():
        try:
            n = 0
            while True:
                n += 1
                yield Event(n=n)
                await asyncio.sleep(0)
        finally:
            closed.set()

    async def scenario():
        sent = 0

        async def send(message):
            nonlocal sent
            sent += 1
            if sent == 3:
                raise OSError("connection reset")

        async def receive():
            await asyncio.sleep(3600)

        stream = EventStream(endless())
        try:
            await stream({"type": "http", "asgi": {"spec_version": "2.4"}, "method": "GET"}, receive, send)
        except Exception:
            pass
        return closed.is_set()

    assert asyncio.run(scenario())
