"""The shadow worker: first the reference's self-check (shadow/reference_check.py; a
reference that fails it is never judged against, and nothing is sampled), then one
lane's batch off the queue at a time, scored on the reference (within the throttle, in
chunks the batch budget takes) and handed to the recorder; every sample taken ends in
exactly one outcome.

An outage loses no sample (shadow/retry.py): a batch the reference could not score for a
reason outside the request stays queued and is retried with backoff; samples
older than `shadow_max_sample_age_s` are then counted `error`, and a full queue still
drops. A batch that timed out TIMEOUT_TRIES times is an error: too large for
--shadow-timeout-s (the reference would compute it in vain again), not an outage.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from shadow.lanes import Lane, Lanes
from shadow.metrics import ShadowMetrics
from shadow.queue import SampleQueue, ShadowSample
from shadow.recording import Recorder
from shadow.reference_check import ReferenceCheck
from shadow.retry import Backoff
from shadow.scoring import (
    MAX_BATCH_SEQUENCES,
    AdapterUnavailableError,
    ReferenceUnavailableError,
    ScoredSequence,
    ScoreItem,
    Scorer,
    ShadowReferenceError,
)
from shadow.settings import ShadowSettings
from shadow.throttle import Throttle

log = logging.getLogger(__name__)

READY_POLL_S = 1.0  # how often the self-check looks whether a remote reference has come up
TIMEOUT_TRIES = 2  # a batch that times out this often is an error, not an outage


class Worker:
    def __init__(self, settings: ShadowSettings, scorer: Scorer, queue: SampleQueue, lanes: Lanes, throttle: Throttle,
                 recorder: Recorder, *, scoring: asyncio.Lock, batch_tokens: Callable[[], int],
                 noise_top_k: Callable[[], int | None], unshadow: Callable[[Lane, str], None],
                 self_check: Callable[[], Awaitable[ReferenceCheck]] | None = None, reference_name: str = "reference"):
        """`scoring`: held while a batch is scored (adapters are (un)mounted between
        batches); `batch_tokens`: the padded batch a forward takes; `noise_top_k`: the
        noise floor's top-k (None: off); `unshadow`: a lane the reference cannot score;
        `self_check`: the reference's, run before the first batch."""
        self._settings = settings
        self._scorer = scorer
        self._queue = queue
        self._lanes = lanes
        self._throttle = throttle
        self._recorder = recorder
        self._scoring = scoring
        self._batch_tokens = batch_tokens
        self._noise_top_k = noise_top_k
        self._unshadow = unshadow
        self._self_check = self_check
        self._reference_name = reference_name
        self.reference_check: ReferenceCheck | None = None  # None: not (yet) checked
        self.backoff_sleep = asyncio.sleep  # waits between tries of an unreachable reference (cancellable)
        self._backoff = Backoff(rng=random.Random())

    async def run(self) -> None:
        """The self-check, then batches until cancelled, each followed by the throttle's
        pause; none after the reference was refused."""
        await self.check_reference()
        if self.reference_check is not None and not self.reference_check.trusted:
            return
        while True:
            if (task := asyncio.current_task()) is not None and task.cancelling():
                raise asyncio.CancelledError  # a stop's cancel that asyncio.wait_for (3.11) swallowed
            batch = await self._queue.next_batch(self._lanes, self._batch_tokens())
            try:
                await self._work(batch)
            finally:
                self._queue.done(batch)
            await self._throttle.idle()

    async def check_reference(self, retry: bool = True) -> ReferenceCheck | None:
        """Run the self-check once (no-op without one, or when done). `retry`: a check that
        cannot run (the reference not reachable yet, a failed call) is retried with backoff
        until it can (the server); without it the failure is raised (verify)."""
        delay = 1.0
        while self._self_check is not None and self.reference_check is None:
            if retry and not self._scorer.ready:  # a remote reference not reachable yet: its watch says when it is
                await asyncio.sleep(READY_POLL_S)
                self.expire([])  # samples wait for the check, within their age
                continue
            try:
                if not self._scorer.ready:
                    raise ShadowReferenceError("the reference is not reachable yet")
                self._settle(await self._self_check())
            except Exception as exc:
                if not retry:
                    raise
                log.warning("shadow: the reference self-check could not run (%s); retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 60.0)
                self.expire([])
        return self.reference_check

    def _settle(self, check: ReferenceCheck) -> None:
        self.reference_check = check
        if check.trusted:
            log.info("shadow: reference %s passed its self-check: %s", self._reference_name, check.summary())
            return
        log.error("shadow: REFUSING to judge against the reference %s (nothing is sampled): %s. %s",
                  self._reference_name, "; ".join(check.reasons), check.summary())
        self._queue.drop_everything(self._lanes, "skipped")  # taken before the refusal: nothing to compare them against

    async def _work(self, batch: list[ShadowSample]) -> None:
        """Score a batch and record it, retrying (with backoff) while the reference cannot
        answer; every sample ends in exactly one outcome."""
        timeouts = 0
        while batch:
            metrics = self._metrics(batch[0].adapter)
            try:
                async with self._scoring:
                    lane = self._lanes.live(batch[0].adapter, batch[0].adapter_id)
                    if lane is None or lane.unshadowed is not None:  # unmounted (or unshadowed) after it was taken
                        metrics.sample("skipped" if lane is None else "error", len(batch))
                        return
                    stats = await self._process(batch)
            except asyncio.CancelledError:  # shutdown ran out of drain time before scoring ended
                metrics.sample("dropped", len(batch))
                raise
            except (ReferenceUnavailableError, TimeoutError) as exc:  # outside the request: keep the samples
                timeouts += isinstance(exc, TimeoutError)
                if not await self._outage(batch, exc, timeouts, metrics):
                    return
                batch = self.expire(batch)
                continue
            except AdapterUnavailableError as exc:
                metrics.sample("error", len(batch))
                self._unshadow(self._lanes.live(batch[0].adapter), str(exc))
                return
            except Exception as exc:  # never let one bad batch stop the worker
                log.warning("shadow: reference failed on %d samples: %s", len(batch), str(exc) or type(exc).__name__)
                metrics.sample("error", len(batch))
                return
            self._backoff.reset()
            await self._record(batch, stats)
            return

    async def _outage(self, batch: list[ShadowSample], exc: Exception, timeouts: int, metrics: ShadowMetrics) -> bool:
        """The reference could not answer: wait out the backoff and return True (try the
        batch again), or count it `error` after TIMEOUT_TRIES timeouts and return False. A
        shutdown meanwhile counts it `dropped` and raises CancelledError."""
        if (task := asyncio.current_task()) is not None and task.cancelling():
            # asyncio.wait_for (3.11) can swallow a cancel that meets a failing call: shutdown wins
            metrics.sample("dropped", len(batch))
            raise asyncio.CancelledError from exc
        if timeouts >= TIMEOUT_TRIES:
            log.warning("shadow: %d samples timed out %d times (--shadow-timeout-s %gs): errors; raise the "
                        "timeout or lower --shadow-batch-tokens", len(batch), timeouts, self._settings.shadow_timeout_s)
            metrics.sample("error", len(batch))
            return False
        metrics.retried()
        wait = self._backoff.delay(getattr(exc, "retry_after", None))
        log.warning("shadow: the reference could not score %d samples (%s); retrying in %.1fs", len(batch),
                    str(exc) or type(exc).__name__, wait)
        try:
            await self.backoff_sleep(wait)
        except asyncio.CancelledError:  # shutdown during an outage
            metrics.sample("dropped", len(batch))
            raise
        return True

    async def _record(self, batch: list[ShadowSample], stats: list[ScoredSequence]) -> None:
        """Comparison, metrics and capture off the event loop: the server's requests share
        it. Finished even if shutdown cancels us: the batch was scored."""
        recorded = asyncio.ensure_future(asyncio.to_thread(self._recorder.record, batch, stats))
        try:
            await asyncio.shield(recorded)
        except asyncio.CancelledError:
            await recorded
            raise
        except Exception:  # record counts per sample; this is a bug past that: keep going
            log.exception("shadow: recording a batch failed")

    def expire(self, batch: list[ShadowSample]) -> list[ShadowSample]:
        """While the reference cannot answer: the samples older than
        --shadow-max-sample-age-s, in `batch` and in the queue, are counted `error`; the
        rest of `batch` is returned, to be tried again."""
        oldest = time.monotonic() - self._settings.shadow_max_sample_age_s

        def expired(sample: ShadowSample) -> bool:
            return sample.finished_at < oldest

        for sample in self._queue.take(expired, self._lanes):
            self._metrics(sample.adapter).sample("error")
        kept = [sample for sample in batch if not expired(sample)]
        if len(kept) < len(batch):
            self._metrics(batch[0].adapter).sample("error", len(batch) - len(kept))
            log.warning("shadow: %d samples waited longer than --shadow-max-sample-age-s %gs for the reference: errors",
                        len(batch) - len(kept), self._settings.shadow_max_sample_age_s)
        return kept

    async def _process(self, batch: list[ShadowSample]) -> list[ScoredSequence]:
        """The reference's statistics for every sequence of the batch; raises what the
        reference raised (the caller decides what it means for the samples)."""
        items = [
            ScoreItem(seq.prompt_ids, seq.output_ids, seq.logprobs.candidate_ids())
            for sample in batch
            for seq in sample.sequences
        ]
        noise_top_k = self._noise_top_k()
        adapter = batch[0].adapter
        metrics = self._metrics(adapter)
        stats: list[ScoredSequence] = []
        # A lone sample of several sequences can exceed the budget padded together: split it.
        for n, chunk in enumerate(chunks(items, self._batch_tokens())):
            if n:
                await self._throttle.idle()
            with self._throttle.forward():
                stats += await asyncio.wait_for(
                    self._scorer.score(chunk, self._settings.shadow_reference_top_m, noise_top_k, adapter or None),
                    self._settings.shadow_timeout_s if self._scorer.cancellable else None,
                )
            metrics.reference_latency(self._throttle.busy_s)
        return stats

    def _metrics(self, adapter: str) -> ShadowMetrics:
        """A lane's metrics, live or retired (the base's when it is gone altogether)."""
        lane = self._lanes.find(adapter)
        return lane.metrics if lane is not None else self._lanes.base.metrics


def chunks(items: list[ScoreItem], budget: int) -> list[list[ScoreItem]]:
    """Consecutive runs of items whose padded size (items x longest) fits `budget`."""
    out: list[list[ScoreItem]] = []
    chunk: list[ScoreItem] = []
    longest = 0
    for item in items:
        size = len(item.prompt_ids) + len(item.output_ids)
        if chunk and ((len(chunk) + 1) * max(longest, size) > budget or len(chunk) >= MAX_BATCH_SEQUENCES):
            out.append(chunk)
            chunk, longest = [], 0
        chunk.append(item)
        longest = max(longest, size)
    return [*out, chunk] if chunk else out
