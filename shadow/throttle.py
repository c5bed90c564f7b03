"""The reference's share of the machine: it uses the serving engine's idle capacity.

While the engine holds requests (`engine_load` > 0) the reference is held back: after
each forward it pauses long enough that it computes at most a `shadow_max_duty` share of
the time, and its threads are confined (a local reference's `throttle`). While the
engine is idle it runs free: no pause, every core, and a pause in progress ends as soon
as the engine empties. Without an `engine_load` it is always held back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from shadow.lanes import Lanes
from shadow.scoring import Scorer
from shadow.settings import ShadowSettings

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.1  # how often a paused reference looks whether the engine has emptied


def duty_idle_s(busy_s: float, duty: float) -> float:
    """Idle after `busy_s` of reference work so that busy / (busy + idle) = duty."""
    return max(busy_s, 0.0) * (1.0 - duty) / duty


class Throttle:
    def __init__(self, settings: ShadowSettings, scorer: Scorer, lanes: Lanes,
                 engine_load: Callable[[], int] | None = None):
        """`engine_load`: the requests the serving engine holds (running or waiting); the
        reference runs free only at 0 (None: always held back)."""
        self._settings = settings
        self._scorer = scorer
        self._lanes = lanes
        self._engine_load = engine_load
        self.held_back: bool | None = None  # the reference's threads as last set
        self.busy_s = 0.0  # reference time of the last forward, not yet paid back by idling
        self.clock = time.perf_counter
        self.sleep = self.pause  # replaceable in tests
        self._wake = asyncio.Event()  # set on stop: a pause ends at once, the queue drains
        self._stopping = False

    def stop(self) -> None:
        """Shutdown: a pause in progress ends, and none starts while the queue drains."""
        self._stopping = True
        self._wake.set()

    async def idle(self) -> None:
        """Pay back the last forward's reference time so the reference computes at most a
        `shadow_max_duty` share of the time while the engine has requests; samples
        arriving meanwhile wait in the bounded queue or are dropped. The pause ends when
        the engine empties, and never starts while draining at shutdown."""
        busy, self.busy_s = self.busy_s, 0.0
        deadline = self.clock() + duty_idle_s(busy, self._settings.shadow_max_duty)
        while not self._stopping and (left := deadline - self.clock()) > 0 and self.engine_busy():
            await self.sleep(left if self._engine_load is None else min(left, IDLE_POLL_S))

    def engine_busy(self) -> bool:
        if self._engine_load is None:
            return True
        try:
            return self._engine_load() > 0
        except Exception:  # a signal that cannot be read: hold the reference back
            log.exception("shadow: the engine's load could not be read")
            return True

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Around each reference forward: its threads set first (held back while the
        engine has requests, every core while it is idle), its time kept in `busy_s`."""
        self._set_threads()
        started = self.clock()
        try:
            yield
        finally:
            self.busy_s = self.clock() - started

    def _set_threads(self) -> None:
        held_back = self.engine_busy()
        if held_back == self.held_back:
            return
        self.held_back = held_back
        for lane in self._lanes:
            lane.metrics.throttled(held_back)
        throttle = getattr(self._scorer, "throttle", None)  # a local reference's threads; a remote one has none
        if throttle is not None:
            try:
                throttle(held_back)
            except Exception:
                log.exception("shadow: the reference's threads could not be set")

    async def pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass
