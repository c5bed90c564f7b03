"""An outage of the reference loses no sample (shadow/worker.py, shadow/retry.py): a batch
the reference could not score for a reason outside the request stays queued and is
retried with backoff; only samples older than --shadow-max-sample-age-s become errors,
a full queue still drops, and an error about the request itself is not retried. The
scorers are narrow fault-injection doubles; the path, queue and metrics are the real ones."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from prometheus_client import CollectorRegistry

from shadow.metrics import ShadowMetrics
from shadow.path import ShadowPath
from shadow.queue import ShadowSample, ShadowSequence
from shadow.retry import MAX_ASKED_S, Backoff
from shadow.scoring import AdapterUnavailableError, ReferenceUnavailableError, ShadowReferenceError
from shadow.settings import ShadowSettings
from tests.scorers import LP, EchoScorer, settle


class FlakyScorer(EchoScorer):
    """Fails its first `failures` calls with `error` (clearing `reachable` as a remote
    scorer does), then answers as EchoScorer."""

    def __init__(self, failures: int, error: Exception | None = None, fail_after: float = 0.0):
        super().__init__()
        self.failures, self.error, self.calls, self.fail_after = failures, error, 0, fail_after
        self.reachable = True

    async def score(self, items, top_m, noise_top_k=None, adapter=None):
        self.calls += 1
        if self.calls <= self.failures:
            await asyncio.sleep(self.fail_after)
            self.reachable = False
            raise self.error or ReferenceUnavailableError("remote reference unavailable: connection refused")
        self.reachable = True
        return await super().score(items, top_m, noise_top_k, adapter)


def sample(request_id: str = "r", finished_at: float | None = None) -> ShadowSample:
    extra = {} if finished_at is None else {"finished_at": finished_at}
    return ShadowSample(request_id, "cand", [ShadowSequence([5, 6, 7], [1] * 3, [dict(LP)] * 3)], **extra)


def make(scorer, **overrides) -> tuple[ShadowPath, list[float]]:
    """A path whose backoff waits are recorded (and shortened to nothing)."""
    settings = ShadowSettings(**{"shadow_rate": 1.0, "shadow_timeout_s": 5.0, **overrides})
    path = ShadowPath(settings, scorer, ShadowMetrics(CollectorRegistry(), "cand", scorer.name), rng=random.Random(0))
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    path._backoff_sleep = no_wait
    return path, waits


def value(path: ShadowPath, metric: str, **labels) -> float:
    return path.metrics._registry.get_sample_value(metric, {**path.metrics._base, **labels}) or 0.0


def outcomes(path: ShadowPath) -> dict[str, float]:
    return {k: v for k, v in path.metrics.outcomes().items() if v}


def test_every_sample_of_an_outage_is_compared_once_the_reference_answers():
    scorer = FlakyScorer(failures=5)
    path, waits = make(scorer)

    async def scenario():
        path.start()
        for n in range(6):
            path.submit(sample(str(n)))
        await settle(lambda: path.metrics.outcomes()["compared"] == 6)
        await path.stop()

    asyncio.run(scenario())
    assert outcomes(path) == {"compared": 6}
    assert value(path, "shadow_reference_retries_total") == 5 and len(waits) == 5
    assert all(0 < w <= 10 for w in waits) and waits[1] > waits[0] / 2  # growing, capped
    assert value(path, "shadow_reference_up") == 1  # read from the scorer at each scrape


def test_the_up_gauge_reads_zero_while_the_reference_does_not_answer():
    scorer = FlakyScorer(failures=10**6)
    path, _ = make(scorer, shadow_drain_s=0.0)

    async def scenario():
        path.start()
        path.submit(sample())
        await settle(lambda: scorer.calls >= 3)
        up = value(path, "shadow_reference_up")
        await path.stop()
        return up

    assert asyncio.run(scenario()) == 0
    assert outcomes(path) == {"dropped": 1}  # shut down mid-outage: dropped, not an error


def test_a_shutdown_while_waiting_to_retry_counts_the_batch_dropped():
    scorer = FlakyScorer(failures=10**6)
    path, _ = make(scorer, shadow_drain_s=0.0)
    path._backoff_sleep = asyncio.sleep  # really waiting when the shutdown comes

    async def scenario():
        path.start()
        path.submit(sample())
        await settle(lambda: scorer.calls >= 1)
        await asyncio.sleep(0.01)  # in its backoff now
        await path.stop()

    asyncio.run(scenario())
    assert outcomes(path) == {"dropped": 1}


def test_samples_older_than_the_maximum_age_become_errors_the_rest_wait():
    scorer = FlakyScorer(failures=2)
    path, _ = make(scorer, shadow_max_sample_age_s=60.0)
    loop_time = time.monotonic()

    async def scenario():
        path.start()
        path.submit(sample("old", finished_at=loop_time - 120))
        path.submit(sample("older", finished_at=loop_time - 300))
        path.submit(sample("new"))
        await settle(lambda: sum(path.metrics.outcomes().values()) == 3)
        await path.stop()

    asyncio.run(scenario())
    assert outcomes(path) == {"error": 2, "compared": 1}


def test_retry_after_is_honoured():
    error = ReferenceUnavailableError("remote reference answered 429")
    error.retry_after = 7.0
    path, waits = make(FlakyScorer(failures=1, error=error))

    async def scenario():
        path.start()
        path.submit(sample())
        await settle(lambda: path.metrics.outcomes()["compared"] == 1)
        await path.stop()

    asyncio.run(scenario())
    assert waits == [7.0]


def test_an_error_about_the_request_is_not_retried():
    path, waits = make(FlakyScorer(failures=1, error=ShadowReferenceError("remote reference answered 400: bad ids")))
    asyncio.run(_one(path))
    assert outcomes(path) == {"error": 1} and waits == [] and value(path, "shadow_reference_retries_total") == 0


def test_a_full_queue_still_drops_during_an_outage():
    scorer = FlakyScorer(failures=10**6)
    path, _ = make(scorer, shadow_queue_size=2, shadow_drain_s=0.0)

    async def scenario():
        path.start()
        path.submit(sample("taken"))  # the worker takes it and retries it
        await settle(lambda: scorer.calls >= 1)
        for n in range(4):
            path.submit(sample(str(n)))  # two wait, two find the queue full
        await path.stop()

    asyncio.run(scenario())
    assert outcomes(path) == {"dropped": 5}  # 2 full-queue drops, then 3 left at shutdown


def test_a_full_queue_with_a_carried_sample_survives_a_retry():
    """The queue holds its size plus the sample carried over to open the next batch; a retry
    puts the waiting ones back without overflowing it (the worker would die of QueueFull)."""
    scorer = FlakyScorer(failures=1, fail_after=0.2)
    path, _ = make(scorer, shadow_queue_size=2, shadow_batch_tokens=6)  # one 6-token sample per batch

    async def scenario():
        path.submit(sample("0"))
        path.submit(sample("1"))
        path.start()  # takes 0; 1 does not fit its batch: carried
        await settle(lambda: scorer.calls == 1)
        path.submit(sample("2"))
        path.submit(sample("3"))  # the queue is full again, beside the carry
        await settle(lambda: path.metrics.outcomes()["compared"] == 4)
        await path.stop()

    asyncio.run(scenario())
    assert outcomes(path) == {"compared": 4}


def test_an_adapter_the_reference_cannot_apply_is_served_unshadowed_and_its_verdict_says_why():
    scorer = FlakyScorer(failures=1, error=AdapterUnavailableError("the adapter a is not on the reference"))
    scorer.add_adapter = lambda name, path: None
    path, _ = make(scorer)

    async def scenario():
        await path.add_adapter("a", "/adapters/a", adapter_id=1)
        path.start()
        assert path.admit(adapter="a", adapter_id=1)
        path.submit(ShadowSample("r", "a", sample().sequences, adapter="a", adapter_id=1))
        await settle(lambda: path.lane("a").unshadowed is not None)
        await path.stop()

    asyncio.run(scenario())
    lane = path.lane("a")
    assert lane.metrics.outcomes()["error"] == 1
    assert not path.admit(adapter="a", adapter_id=1) and path.admit()  # that adapter only
    report = path.report(adapter="a")
    assert report.verdict.status == "inconclusive"
    assert report.verdict.reasons[0].startswith("not shadowed") and "not on the reference" in report.verdict.reasons[0]


def test_a_run_time_mount_the_reference_cannot_take_is_unshadowed_or_refused():
    def refuse(name, path):
        raise AdapterUnavailableError(f"the adapter {name} is not on the remote reference, which does not allow run-time loads")

    scorer = EchoScorer()
    scorer.add_adapter = refuse
    path, _ = make(scorer)

    async def scenario():
        with pytest.raises(AdapterUnavailableError):  # at start: the caller refuses to start
            await path.add_adapter("a", "/adapters/a", adapter_id=1)
        assert path.lane("a") is None
        why = await path.add_adapter("a", "/adapters/a", adapter_id=2, allow_unshadowed=True)
        return why

    why = asyncio.run(scenario())
    assert "does not allow run-time loads" in why
    assert path.lane("a").unshadowed == why and not path.admit(adapter="a", adapter_id=2)
    assert "does not allow run-time loads" in path.report(adapter="a").verdict.reasons[0]


async def _one(path: ShadowPath) -> None:
    path.start()
    path.submit(sample())
    await settle(lambda: sum(path.metrics.outcomes().values()) == 1)
    await path.stop()


def test_backoff_doubles_with_equal_jitter_to_its_cap_and_takes_retry_after():
    backoff = Backoff(first=0.5, cap=4.0, rng=random.Random(1))
    delays = [backoff.delay() for _ in range(6)]
    for delay, step in zip(delays, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        assert step / 2 <= delay <= step
    assert backoff.delay(asked=3.0) == 3.0 and backoff.delay(asked=10**4) == MAX_ASKED_S
    assert backoff.delay(asked=0.0) == 2.0  # never a busy loop on "Retry-After: 0"
    backoff.reset()
    assert backoff.delay() <= 0.5
