"""Shutdown and death, as Kubernetes expects them.

SIGTERM: /health turns 503 and new requests are refused (503), the listener stays open
while in-flight requests finish (at most `shutdown_grace_s`), then uvicorn stops, the
shadow queue drains and the process exits 0. A second SIGTERM, or SIGINT, stops at once.
An engine that dies ends the process with a non-zero status (see app.py's watchdog).
A start that never finished (SIGTERM during load, --start-timeout-s, or an engine whose
start hangs) ends the engine's processes and the process itself without joining the
load thread, which may never return: `abandon_load`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from types import FrameType

import psutil
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)


class InFlight:
    """Requests under a path prefix that have started and not yet sent their last byte."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


class InFlightMiddleware:
    def __init__(self, app: ASGIApp, in_flight: InFlight, prefix: str = "/v1/"):
        self.app = app
        self.in_flight = in_flight
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        self.in_flight.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.leave()


class GracefulServer(uvicorn.Server):
    """uvicorn, with SIGTERM turned into a drain: `drain()` is the app's (stop admitting,
    wait for in-flight work); only then does uvicorn's own shutdown begin."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self._drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._draining and self._loop is not None and not self.should_exit:
            # Not recorded as captured: uvicorn would re-raise it after shutdown, and a
            # drained server should exit 0, not die of the signal.
            self._draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)
        if self._draining or sig == signal.SIGINT:  # a second signal, or Ctrl-C: no more waiting
            self.force_exit = True

    def _start_drain(self) -> None:
        self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        started = time.monotonic()
        try:
            await self._drain()
        except Exception:
            log.exception("drain failed")
        log.info("drained in %.1fs; shutting down", time.monotonic() - started)
        self.should_exit = True


def abandon_load(error: str | None, grace_s: float = 5.0) -> None:
    """Ends the process while the engine's load thread still runs: the engine's child
    processes (vLLM's EngineCore and its workers) get SIGTERM, then SIGKILL after
    `grace_s`, and the process exits at once (1 with `error`, else 0): a normal exit would
    join the engine's non-daemon processes and run the hung engine's exit hooks."""
    children = psutil.Process().children(recursive=True)
    for child in children:
        _signal(child, psutil.Process.terminate)
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        _signal(child, psutil.Process.kill)
    psutil.wait_procs(alive, timeout=grace_s)
    log.warning("engine start abandoned: %d engine process(es) ended", len(children))
    if error:
        print(f"shadowserve serve: {error}", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if error else 0)


def _signal(process: psutil.Process, send) -> None:
    try:
        send(process)
    except psutil.NoSuchProcess:
        pass
