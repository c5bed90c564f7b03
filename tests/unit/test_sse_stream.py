"""The stream's wire format, as clients that parse SSE by hand read it: vLLM's own
`bench serve` client (its StreamedResponseHandler) loses every event after a comment
line until two events share one read — the usage chunk included. Its benchmark of this
server counted 19,944 output tokens for 32,768 generated while keep-alive pings were on."""

from __future__ import annotations

import json

from pydantic import BaseModel
from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler

from server.serving.context import sse_response


class Event(BaseModel):
    n: int


async def events(count: int):
    for n in range(count):
        yield Event(n=n)


def body_reads(count: int) -> list[bytes]:
    """Each chunk the server sends, one per network read, through a real Starlette app."""
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    app = Starlette(routes=[Route("/stream", lambda request: sse_response(events(count)))])
    with TestClient(app) as client, client.stream("GET", "/stream") as reply:
        return [chunk for chunk in reply.iter_raw() if chunk]


def test_the_stream_sends_no_keepalive_comments():
    response = sse_response(events(3))
    assert response.ping_interval == 0  # a comment every N s would interleave with events


def test_vllms_bench_client_reads_every_event_and_done():
    reads = body_reads(5)
    assert not any(r.lstrip().startswith(b":") for r in reads)
    handler, received = StreamedResponseHandler(), []
    for chunk in reads:  # as the client does: each read stripped, then buffered
        for message in handler.add_chunk(chunk.strip()):
            received.append(message.removeprefix("data: "))
    assert received[-1] == "[DONE]"
    assert [json.loads(m)["n"] for m in received[:-1]] == [0, 1, 2, 3, 4]
