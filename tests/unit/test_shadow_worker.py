"""The shadow worker (shadow/worker.py) on its own: batches split into chunks the
reference's budget takes, timeouts that become errors, expired samples, a refused
reference. The queue, lanes, throttle and recorder are the real ones."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from shadow.lanes import Lanes
from shadow.metrics import ShadowMetrics
from shadow.queue import SampleQueue, ShadowSample, ShadowSequence
from shadow.recording import Recorder
from shadow.reference_check import ReferenceCheck
from shadow.scoring import MAX_BATCH_SEQUENCES, ScoreItem
from shadow.settings import ShadowSettings
from shadow.throttle import Throttle
from shadow.worker import TIMEOUT_TRIES, Worker, chunks
from tests.scorers import LP, EchoScorer

LABELS = {"model": "cand", "reference": "echo", "adapter": ""}


def item(prompt: int, output: int) -> ScoreItem:
    return ScoreItem([5] * prompt, [1] * output, [[1]] * output)


def test_chunks_keep_each_padded_run_within_the_budget_and_in_order():
    items = [item(2, 2), item(2, 2), item(4, 4), item(1, 1)]
    runs = chunks(items, 10)
    assert runs == [[items[0], items[1]], [items[2]], [items[3]]]  # 2 x 4 fits; 3 x 8 would not
    assert chunks([item(20, 20)], 10) == [[item(20, 20)]]  # a lone item past the budget still goes alone
    assert chunks([], 10) == []
    many = chunks([item(1, 1)] * (MAX_BATCH_SEQUENCES + 1), 10**9)
    assert [len(run) for run in many] == [MAX_BATCH_SEQUENCES, 1]


class Hanging(EchoScorer):
    async def score(self, items, top_m, noise_top_k=None, adapter=None):
        self.batches.append(len(items))
        await asyncio.sleep(60)


def make(scorer, self_check=None, **overrides):
    settings = ShadowSettings(**{"shadow_rate": 1.0, "shadow_max_duty": 1.0, **overrides})
    registry = CollectorRegistry()
    lanes = Lanes(ShadowMetrics(registry, "cand", scorer.name), 16)
    queue = SampleQueue(settings.shadow_queue_size, settings.shadow_queue_tokens)
    throttle = Throttle(settings, scorer, lanes, lambda: 0)
    recorder = Recorder(settings, lanes, None, scorer.name, lambda adapter: None)
    worker = Worker(settings, scorer, queue, lanes, throttle, recorder, scoring=asyncio.Lock(),
                    batch_tokens=lambda: settings.shadow_batch_tokens, noise_top_k=lambda: None,
                    unshadow=lambda lane, reason: None, self_check=self_check)

    async def no_wait(seconds):
        await asyncio.sleep(0)

    worker.backoff_sleep = no_wait
    return worker, queue, lanes, lambda outcome: registry.get_sample_value(
        "shadow_samples_total", {**LABELS, "outcome": outcome})


def sample(request_id: str, finished_at: float | None = None) -> ShadowSample:
    extra = {} if finished_at is None else {"finished_at": finished_at}
    return ShadowSample(request_id, "cand", [ShadowSequence([5, 6], [1, 1], [dict(LP)] * 2)], **extra)


def test_a_batch_that_keeps_timing_out_is_an_error_not_an_outage():
    scorer = Hanging()

    async def run():
        worker, queue, lanes, outcome = make(scorer, shadow_timeout_s=0.01)
        queue.put(sample("a"), lanes.base)
        task = asyncio.create_task(worker.run())
        while outcome("error") == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return outcome

    outcome = asyncio.run(run())
    assert len(scorer.batches) == TIMEOUT_TRIES and outcome("error") == 1 and outcome("compared") == 0


def test_expire_counts_old_samples_in_the_batch_and_the_queue_as_errors():
    async def run():
        worker, queue, lanes, outcome = make(EchoScorer(), shadow_max_sample_age_s=10.0)
        old, new = time.monotonic() - 60.0, time.monotonic()
        queue.put(sample("queued-old", old), lanes.base)
        queue.put(sample("queued-new", new), lanes.base)
        kept = worker.expire([sample("old", old), sample("new", new)])
        return kept, queue.qsize(), outcome("error")

    kept, waiting, errors = asyncio.run(run())
    assert [s.request_id for s in kept] == ["new"] and waiting == 1 and errors == 2


def test_a_refused_reference_stops_the_worker_and_skips_what_waits():
    refused = ReferenceCheck(trusted=False, reasons=["broken"], tokens=4, reference_perplexity=None,
                             candidate_perplexity=2.0, excess_nats=None, max_excess_nats=0.25)

    async def self_check():
        return refused

    async def run():
        scorer = EchoScorer()
        worker, queue, lanes, outcome = make(scorer, self_check=self_check)
        queue.put(sample("a"), lanes.base)
        await asyncio.wait_for(worker.run(), 2.0)  # returns: no batch is ever taken
        return worker, scorer, outcome

    worker, scorer, outcome = asyncio.run(run())
    assert worker.reference_check is refused and scorer.batches == [] and outcome("skipped") == 1
