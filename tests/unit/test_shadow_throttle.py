"""The reference's throttle (shadow/throttle.py) on its own: the duty-cycle pause, its end
when the engine empties or the path stops, and the threads set once per change."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from shadow.lanes import Lanes
from shadow.metrics import ShadowMetrics
from shadow.settings import ShadowSettings
from shadow.throttle import IDLE_POLL_S, Throttle, duty_idle_s

LABELS = {"model": "cand", "reference": "ref", "adapter": ""}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Scorer:
    def __init__(self):
        self.throttled: list[bool] = []

    def throttle(self, held_back: bool) -> None:
        self.throttled.append(held_back)


def make(load, duty: float = 0.25):
    registry = CollectorRegistry()
    lanes = Lanes(ShadowMetrics(registry, "cand", "ref"), 16)
    scorer = Scorer()
    throttle = Throttle(ShadowSettings(shadow_max_duty=duty), scorer, lanes, load)
    clock, pauses = Clock(), []

    async def sleep(seconds):
        pauses.append(seconds)
        clock.now += seconds

    throttle.clock, throttle.sleep = clock, sleep
    return throttle, scorer, registry, pauses


def test_duty_idle_s_keeps_the_reference_to_its_share():
    assert duty_idle_s(2.0, 0.25) == pytest.approx(6.0)
    assert duty_idle_s(2.0, 1.0) == 0.0
    assert duty_idle_s(-1.0, 0.5) == 0.0  # a clock that went backwards pays nothing back


def test_a_busy_engine_pays_the_forward_back_in_short_polls():
    throttle, _, _, pauses = make(lambda: 3)
    throttle.busy_s = 2.0
    asyncio.run(throttle.idle())
    assert sum(pauses) == pytest.approx(6.0) and max(pauses) <= IDLE_POLL_S + 1e-9
    assert throttle.busy_s == 0.0  # paid back once
    pauses.clear()
    asyncio.run(throttle.idle())
    assert pauses == []


def test_without_a_load_signal_the_pause_is_one_sleep():
    throttle, _, _, pauses = make(None)
    throttle.busy_s = 2.0
    asyncio.run(throttle.idle())
    assert pauses == [pytest.approx(6.0)]


def test_the_pause_ends_when_the_engine_empties():
    load = [2]
    throttle, _, _, pauses = make(lambda: load[0])

    async def sleep(seconds):
        pauses.append(seconds)
        throttle.clock.now += seconds
        if len(pauses) == 3:
            load[0] = 0

    throttle.sleep = sleep
    throttle.busy_s = 2.0
    asyncio.run(throttle.idle())
    assert len(pauses) == 3 and throttle.clock.now == pytest.approx(0.3)


def test_an_idle_engine_or_a_stop_means_no_pause():
    throttle, _, _, pauses = make(lambda: 0)
    throttle.busy_s = 2.0
    asyncio.run(throttle.idle())
    busy, _, _, busy_pauses = make(lambda: 1)
    busy.busy_s = 2.0
    busy.stop()
    asyncio.run(busy.idle())
    assert pauses == [] and busy_pauses == []


def test_a_real_pause_ends_at_once_on_stop():
    throttle, _, _, _ = make(lambda: 1)

    async def run():
        task = asyncio.create_task(throttle.pause(60.0))
        await asyncio.sleep(0)
        throttle.stop()
        await asyncio.wait_for(task, 2.0)

    asyncio.run(run())


def test_a_failing_load_signal_holds_the_reference_back():
    def broken() -> int:
        raise RuntimeError("no stats")

    throttle, _, _, _ = make(broken)
    assert throttle.engine_busy()


def test_forward_sets_the_threads_once_per_change_and_keeps_its_time():
    load = [1]
    throttle, scorer, registry, _ = make(lambda: load[0])
    for n in (1, 1, 0, 0, 1):
        load[0] = n
        with throttle.forward():
            throttle.clock.now += 0.5
        assert throttle.busy_s == pytest.approx(0.5)
        assert registry.get_sample_value("shadow_reference_throttled", LABELS) == n
    assert scorer.throttled == [True, False, True]

    with pytest.raises(RuntimeError), throttle.forward():  # a failed forward's time counts too
        throttle.clock.now += 2.0
        raise RuntimeError("reference failed")
    assert throttle.busy_s == pytest.approx(2.0)
