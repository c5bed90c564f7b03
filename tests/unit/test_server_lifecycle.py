"""Shutdown as Kubernetes expects it (server/lifecycle.py): requests under /v1/ are counted
while in flight (and the count waited on), and the server turns a SIGTERM into a drain
that runs before uvicorn's own shutdown; a second signal stops it at once. The server runs
on a real socket in a thread (uvicorn installs no signal handlers there, so none is
re-raised into pytest); a whole process's SIGTERM is in tests/integration."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest
import uvicorn

from server.lifecycle import GracefulServer, InFlight, InFlightMiddleware


def test_in_flight_counts_and_is_waited_on():
    async def scenario():
        in_flight = InFlight()
        assert await in_flight.wait_idle(0.01)
        in_flight.enter()
        in_flight.enter()
        assert in_flight.count == 2 and not await in_flight.wait_idle(0.01)
        in_flight.leave()
        asyncio.get_running_loop().call_later(0.02, in_flight.leave)
        assert await in_flight.wait_idle(5.0) and in_flight.count == 0

    asyncio.run(scenario())


def test_only_api_http_requests_are_counted_and_a_failed_one_still_leaves():
    in_flight, seen = InFlight(), []

    async def app(scope, receive, send):
        seen.append((scope.get("path", scope["type"]), in_flight.count))
        if scope.get("path") == "/v1/boom":
            raise RuntimeError("handler failed")

    middleware = InFlightMiddleware(app, in_flight)
    for path in ("/v1/chat/completions", "/health", "/metrics"):
        asyncio.run(middleware({"type": "http", "path": path}, None, None))
    asyncio.run(middleware({"type": "websocket", "path": "/v1/realtime"}, None, None))
    with pytest.raises(RuntimeError):
        asyncio.run(middleware({"type": "http", "path": "/v1/boom"}, None, None))
    assert seen == [("/v1/chat/completions", 1), ("/health", 0), ("/metrics", 0), ("/v1/realtime", 0), ("/v1/boom", 1)]
    assert in_flight.count == 0


async def _app(scope, receive, send):
    pass


def serving(drain) -> tuple[GracefulServer, threading.Thread]:
    server = GracefulServer(uvicorn.Config(_app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"), drain)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    return server, thread


def test_sigterm_drains_first_then_uvicorn_stops():
    steps: list[str] = []
    release = threading.Event()

    async def drain():
        steps.append("draining")
        while not release.is_set():
            await asyncio.sleep(0.01)
        steps.append("drained")

    server, thread = serving(drain)
    server.handle_exit(signal.SIGTERM, None)
    deadline = time.monotonic() + 5
    while not steps:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not server.should_exit and thread.is_alive()  # still serving while it drains
    release.set()
    thread.join(10)
    assert not thread.is_alive() and steps == ["draining", "drained"]
    assert server.should_exit and not server.force_exit


def test_a_second_signal_stops_without_waiting_for_the_drain():
    async def drain():
        await asyncio.sleep(3600)

    server, thread = serving(drain)
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(signal.SIGTERM, None)
    thread.join(10)
    assert not thread.is_alive() and server.should_exit and server.force_exit
