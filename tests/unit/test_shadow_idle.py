"""The reference uses idle capacity: held back (duty cap, confined threads) while the
engine has requests, free (no pause, every core) while it is idle; a pause ends when the
engine empties. Coverage and lag are exported: each compared sample's age, the oldest
waiting sample's age, whether the reference is held back. The engine's load here is a
synthetic signal; the scorer is the real LocalScorer on a tiny random Llama where its
threads matter, an echo double where only the path's timing does."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry

from shadow.local_scorer import LocalScorer
from shadow.metrics import ShadowMetrics
from shadow.path import ShadowPath
from shadow.queue import ShadowSample, ShadowSequence
from shadow.scoring import ScoreItem
from shadow.settings import ShadowSettings
from tests.scorers import LP, EchoScorer, settle, tiny_local_scorer


class Load:
    """The engine's requests in hand, set by the test."""

    def __init__(self, n: int = 0):
        self.n = n

    def __call__(self) -> int:
        return self.n


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


class Throttled(EchoScorer):
    """Each batch takes 2 s of the fake clock; records the throttle it ran under."""

    def __init__(self, clock: Clock):
        super().__init__()
        self.clock, self.held_back, self.runs, self.starts = clock, None, [], []

    def throttle(self, held_back: bool) -> None:
        self.held_back = held_back

    async def score(self, items, top_m, noise_top_k=None, adapter=None):
        self.runs.append(self.held_back)
        self.starts.append(self.clock.now)
        self.clock.now += 2.0
        return await super().score(items, top_m, noise_top_k)


def make(scorer, load: Load | None, **overrides) -> ShadowPath:
    settings = ShadowSettings(**{"shadow_rate": 1.0, "shadow_noise_floor": False, "shadow_max_duty": 0.25, **overrides})
    return ShadowPath(settings, scorer, ShadowMetrics(CollectorRegistry(), "cand", scorer.name), rng=random.Random(0),
                      engine_load=load)


def value(path: ShadowPath, name: str) -> float:
    return path.metrics._registry.get_sample_value(name, path.metrics._base) or 0.0


def short(request_id: str, finished_at: float | None = None) -> ShadowSample:
    sample = ShadowSample(request_id, "cand", [ShadowSequence([5, 6, 7], [1] * 4, [dict(LP)] * 4)])
    return sample if finished_at is None else ShadowSample(sample.request_id, "cand", sample.sequences, finished_at)


def scenario_with(load: Load | None):
    """Two samples, one batch each (batch budget 7 tokens), the fake clock and sleep."""
    clock = Clock()
    scorer = Throttled(clock)
    path = make(scorer, load, shadow_batch_tokens=7)
    pauses: list[float] = []

    async def sleep(seconds):
        pauses.append(seconds)
        clock.now += seconds
        await asyncio.sleep(0)

    path._clock, path._sleep = clock, sleep
    return path, scorer, pauses


def test_a_busy_engine_holds_the_reference_back_and_an_idle_one_lets_it_run_free():
    async def run(load: Load | None):
        path, scorer, pauses = scenario_with(load)
        path.start()
        path.submit(short("a"))
        path.submit(short("b"))
        await settle(lambda: len(scorer.batches) == 2)
        await path.stop()
        return scorer, pauses, value(path, "shadow_reference_throttled")

    busy_scorer, busy_pauses, busy_gauge = asyncio.run(run(Load(3)))
    # 2 s busy at duty 0.25: 6 s of pause before the next batch, in short polls of the engine.
    assert busy_scorer.starts == [0.0, pytest.approx(8.0)]
    assert max(busy_pauses) <= 0.1 + 1e-9
    assert busy_scorer.runs == [True, True] and busy_gauge == 1

    idle_scorer, idle_pauses, idle_gauge = asyncio.run(run(Load(0)))
    assert idle_pauses == [] and idle_scorer.starts == [0.0, 2.0]  # back to back
    assert idle_scorer.runs == [False, False] and idle_gauge == 0

    # No load signal at all (a path without an engine): held back, one whole pause per batch.
    none_scorer, none_pauses, _ = asyncio.run(run(None))
    assert none_pauses[0] == pytest.approx(6.0) and none_scorer.starts == [0.0, pytest.approx(8.0)]
    assert none_scorer.runs == [True, True]


def test_a_pause_ends_when_the_engine_empties():
    load = Load(2)

    async def run():
        path, scorer, pauses = scenario_with(load)

        async def sleep(seconds):  # the engine's last request ends during the third poll
            pauses.append(seconds)
            path._clock.now += seconds
            if len(pauses) == 3:
                load.n = 0
            await asyncio.sleep(0)

        path._sleep = sleep
        path.start()
        path.submit(short("a"))
        path.submit(short("b"))
        await settle(lambda: len(scorer.batches) == 2)
        await path.stop()
        return scorer, pauses

    scorer, pauses = asyncio.run(run())
    assert len(pauses) == 3 and scorer.starts == [0.0, pytest.approx(2.3)]  # not after the 6 s the duty cap asked for
    assert scorer.runs == [True, False]  # the second batch ran free


def test_a_failing_load_signal_holds_the_reference_back():
    def broken() -> int:
        raise RuntimeError("no stats")

    path = make(EchoScorer(), broken)
    assert path._engine_busy()


def test_sample_age_and_the_oldest_waiting_sample_are_exported():
    async def run():
        path = make(EchoScorer(), Load(0))
        assert value(path, "shadow_queue_oldest_age_seconds") == 0
        path.submit(short("old", finished_at=time.monotonic() - 30.0))
        path.submit(short("new"))
        oldest = value(path, "shadow_queue_oldest_age_seconds")  # read at scrape time, worker not started
        path.start()
        await settle(lambda: value(path, "shadow_sample_age_seconds_count") == 2)
        drained = value(path, "shadow_queue_oldest_age_seconds")
        await path.stop()
        return path, oldest, drained

    path, oldest, drained = asyncio.run(run())
    assert 30.0 <= oldest < 60.0 and drained == 0
    ages = path.metrics._registry.get_sample_value
    base = path.metrics._base
    assert 30.0 <= ages("shadow_sample_age_seconds_sum", base) < 61.0
    assert ages("shadow_sample_age_seconds_bucket", {**base, "le": "20.0"}) == 1  # the fresh one
    assert ages("shadow_sample_age_seconds_bucket", {**base, "le": "60.0"}) == 2


@pytest.fixture(scope="module")
def scorer(tokenizer) -> LocalScorer:
    return tiny_local_scorer(tokenizer, seed=5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_local_reference_runs_confined_when_held_back_and_on_every_core_when_free(scorer, tokenizer):
    local = LocalScorer(scorer._model, tokenizer, "tiny", torch.device("cpu"))
    default, nice = torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, 0)
    local.confine(threads=1, nice=10)
    seen: list[tuple[int, int, int]] = []  # (thread id, its torch threads, its nice) per forward
    forward = local._model.forward

    def spy(*args, **kwargs):
        tid = threading.get_native_id()
        seen.append((tid, torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, tid)))
        return forward(*args, **kwargs)

    item = ScoreItem([1, 520, 9531], [300, 301], [[300, 7], [301]])
    local._model.forward = spy
    try:
        local.throttle(True)
        held = asyncio.run(local.score([item], top_m=2))
        local.throttle(False)
        free = asyncio.run(local.score([item], top_m=2))
    finally:
        del local._model.forward
        asyncio.run(local.close())
    assert [len(out[0].reference) for out in (held, free)] == [2, 2]
    (held_tid, held_threads, held_nice), (free_tid, free_threads, free_nice) = seen
    assert held_tid == local.thread_id and held_threads == 1
    assert free_tid != held_tid and free_threads == default
    assert held_nice == free_nice == min(19, nice + 10)
    assert torch.get_num_threads() == default  # nothing else in the process moved
