"""The shadow path: admission sampling, a bounded queue, and one worker that batches
samples, scores them on the reference and records the comparison.

Nothing here can reach a client: `submit` never blocks or raises (a full queue drops
and counts), and every reference failure becomes an `error` outcome.

The reference uses idle capacity: while the engine holds requests (`engine_load` > 0)
it is held back (a `shadow_max_duty` cap on its compute time, its confined threads);
while the engine is idle it runs free (no pause, every core), and a pause in progress
ends as soon as the engine empties. Without an `engine_load` it is always held back.

Requests on mounted LoRA adapters are shadowed per adapter (shadow/lanes.py): scored
against the reference with that adapter applied unmerged, in batches of one adapter;
`add_adapter` / `remove_adapter` mount and unmount one on the reference at run time. An
adapter the reference cannot apply is served unshadowed, and its verdict says why.

An outage loses no sample (shadow/retry.py): a batch the reference could not score for a
reason outside the request stays queued and is retried with backoff; samples older than
`shadow_max_sample_age_s` are then counted `error`, and a full queue still drops.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable

from shadow.calibration import Calibration
from shadow.capture import DivergenceCapture
from shadow.compare import SequenceComparison, compare_sequence
from shadow.history import ComparedSequence, History
from shadow.lanes import BASE, Lane, Lanes
from shadow.metrics import NOISE_FLOOR, ShadowMetrics
from shadow.queue import SampleQueue, ShadowSample, ShadowSequence
from shadow.reference_check import ReferenceCheck
from shadow.report import ShadowReport, build_report
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
from shadow.verdict import CHECKS

__all__ = ["ShadowHeaderError", "ShadowPath", "ShadowSample", "ShadowSequence", "duty_idle_s"]

log = logging.getLogger(__name__)

HEADER_VALUES = ("always", "never")
IDLE_POLL_S = 0.1  # how often a paused reference looks whether the engine has emptied
READY_POLL_S = 1.0  # how often the self-check looks whether a remote reference has come up
TIMEOUT_TRIES = 2  # a batch that times out this often is an error, not an outage


class ShadowHeaderError(ValueError):
    """An `X-Shadow` value other than always/never (a client error)."""


class ShadowPath:
    def __init__(
        self,
        settings: ShadowSettings,
        scorer: Scorer,
        metrics: ShadowMetrics,
        capture: DivergenceCapture | None = None,
        rng: random.Random | None = None,
        *,
        model_name: str = "candidate",
        reference_name: str | None = None,
        self_check: Callable[[], Awaitable[ReferenceCheck]] | None = None,
        calibration: Calibration | None = None,
        engine_load: Callable[[], int] | None = None,
    ):
        """`self_check`: the reference's self-check (shadow/reference_check.py), run before
        the first sample is scored; a reference that fails it is never judged against.
        `calibration`: the serving engine's noise relative to the floor (shadow/calibration.py).
        `engine_load`: the requests the serving engine holds (running or waiting); the
        reference runs free only at 0 (None: always held back)."""
        self.settings = settings
        self.scorer = scorer
        self.metrics = metrics
        self.capture = capture
        self.model_name = model_name
        self.reference_name = reference_name or scorer.name
        self._lanes = Lanes(metrics, settings.shadow_verdict_max_sequences,
                            up=lambda: float(getattr(scorer, "reachable", True)))
        self.history: History = self._lanes.base.history  # the base model's (verify, tests)
        self._rng = rng or random.Random()
        self._queue = SampleQueue(settings.shadow_queue_size, settings.shadow_queue_tokens)
        self._worker: asyncio.Task | None = None
        self._engine_load = engine_load
        self._held_back: bool | None = None  # the reference's throttle as last set
        self._busy_s = 0.0  # reference time of the last forward, not yet paid back by idling
        self._clock = time.perf_counter
        self._sleep = self._pause  # replaceable in tests
        self._backoff_sleep = asyncio.sleep  # waits between tries of an unreachable reference (cancellable)
        self._backoff = Backoff(rng=random.Random())
        self._wake = asyncio.Event()  # set on stop: a pause ends at once, the queue drains
        self._scoring = asyncio.Lock()  # a batch being scored, or an adapter being (un)mounted on the reference
        self._closed = False
        self._self_check = self_check
        self.calibration = calibration
        self.reference_check: ReferenceCheck | None = None  # None: not (yet) checked

    @property
    def refused(self) -> bool:
        """The reference failed its self-check: nothing is sampled or judged."""
        return self.reference_check is not None and not self.reference_check.trusted

    @property
    def top_k(self) -> int:
        return self.settings.shadow_top_k

    @property
    def noise_dtype(self) -> str | None:
        """The serving dtype the noise floor is computed in; None when it is off."""
        return self.scorer.noise_dtype if self.settings.shadow_noise_floor else None

    def lane(self, adapter: str = BASE) -> Lane | None:
        """A mounted adapter's lane ("" the base); None when it is not mounted."""
        return self._lanes.live(adapter)

    @property
    def adapters(self) -> list[str]:
        """The mounted adapters the shadow judges, besides the base."""
        return [lane.adapter for lane in self._lanes if lane.adapter != BASE]

    def report(self, window_s: float | None = None, with_trajectory: bool = False, adapter: str = BASE) -> ShadowReport:
        """The verdict and its statistics over the sequences of the last `window_s`
        seconds (all that are kept when None), for the base or a mounted adapter (KeyError
        when not mounted). CPU work: call it off the event loop."""
        lane = self._lanes.live(adapter)
        if lane is None:
            raise KeyError(adapter)
        report = build_report(
            lane.history.snapshot(window_s), model=self.model_name, reference=self.reference_name,
            noise_dtype=self.noise_dtype, policy=self.settings.verdict_policy, window_s=window_s,
            evicted=lane.history.evicted, with_trajectory=with_trajectory, reference_check=self.reference_check,
            calibration=self.calibration, unshadowed=lane.unshadowed,
        )
        report.adapter = adapter
        return report

    def publish_verdict(self, adapter: str = BASE) -> None:
        """A lane's verdict over everything kept, as gauges (CPU work: off the event loop)."""
        report = self.report(adapter=adapter)
        verdict = report.verdict
        bounds = {name: (i.estimate, _bound(i.low, -1), _bound(i.high, 1))
                  for name in CHECKS if (i := getattr(verdict, name)) is not None}
        sequences = report.candidate.sequences if report.candidate else 0
        self._lanes.live(adapter).metrics.verdict(verdict.status, bool(verdict.different), bounds, sequences,
                                                   verdict.floor.kl_scale if verdict.floor else 1.0)

    # --- mounted adapters ----------------------------------------------------------

    async def add_adapter(self, adapter: str, path, adapter_id: int = 0, *, allow_unshadowed: bool = False) -> str | None:
        """Mount a LoRA adapter on the reference (blocking load in a thread, between
        batches) and open its lane: its requests (of this mount, `adapter_id`) are sampled
        from now on. Mount and lane happen together even if the caller is cancelled.

        A reference that cannot take it (AdapterUnavailableError: a remote one that does
        not hold it and may not load it) raises, or with `allow_unshadowed` opens the lane
        unshadowed and returns why (its verdict says so). None: shadowed."""
        mount = getattr(self.scorer, "add_adapter", None)
        if mount is None:
            raise ShadowReferenceError(f"the reference {self.reference_name} cannot mount LoRA adapters")
        unshadowed: str | None = None

        async def both() -> None:
            nonlocal unshadowed
            async with self._scoring:
                try:
                    await asyncio.to_thread(mount, adapter, path)
                except AdapterUnavailableError as exc:
                    if not allow_unshadowed:
                        raise
                    unshadowed = str(exc)
                lane = self._lanes.add(adapter, adapter_id)
                lane.metrics.throttled(bool(self._held_back))
                if unshadowed is not None:
                    self._unshadow(lane, unshadowed)

        await asyncio.shield(both())
        if unshadowed is None:
            log.info("shadow: adapter %s mounted on the reference (%s)", adapter, path)
        return unshadowed

    def _unshadow(self, lane: Lane, reason: str) -> None:
        """A lane the reference cannot score: nothing more is sampled on it, what waits is
        an error, and its verdict says why."""
        if lane.unshadowed is None:
            log.error("shadow: the adapter %s is served UNSHADOWED: %s", lane.adapter, reason)
        lane.unshadowed = reason
        removed = self._queue.purge(lambda sample: sample.adapter == lane.adapter)
        lane.cleared()
        lane.metrics.sample("error", removed)
        try:
            self.publish_verdict(lane.adapter)
        except Exception:
            log.exception("shadow: the verdict could not be published")

    async def remove_adapter(self, adapter: str, served: bool = True) -> None:
        """Unmount an adapter: its lane closes, its queued samples are counted as skipped,
        the reference drops its weights (between batches). `served=False`: a mount rolled
        back before it served anything, which leaves no series behind."""
        async with self._scoring:
            lane = self._lanes.live(adapter)
            if lane is None or adapter == BASE:
                raise KeyError(adapter)
            removed = self._queue.purge(lambda sample: sample.adapter == adapter)
            lane.metrics.sample("skipped", removed)
            self._lanes.retire(adapter, served)
            unmount = getattr(self.scorer, "remove_adapter", None)
            if unmount is not None:
                await asyncio.to_thread(unmount, adapter)
        log.info("shadow: adapter %s unmounted (%d queued samples skipped)", adapter, removed)

    # --- the request side: cheap and non-blocking ---------------------------------

    def admit(self, header: str | None = None, adapter: str = BASE, adapter_id: int | None = None) -> bool:
        """Decide at admission, so unsampled requests pay nothing. An admitted request
        must end in exactly one outcome: submit() or skip(). A request on an adapter the
        reference does not hold (or holds another load of) is not sampled."""
        lane = self._lanes.live(adapter, adapter_id)
        sampled = not self.refused and self._decide(header) and lane is not None and lane.unshadowed is None
        if sampled:
            lane.metrics.admitted()
        return sampled

    def _decide(self, header: str | None) -> bool:
        if header is not None and self.settings.shadow_allow_header:
            value = header.strip().lower()
            if value not in HEADER_VALUES:
                raise ShadowHeaderError(f"X-Shadow must be one of {', '.join(HEADER_VALUES)}")
            return value == "always"
        rate = self.settings.shadow_rate
        return rate > 0 and (rate >= 1 or self._rng.random() < rate)

    def submit(self, sample: ShadowSample) -> None:
        lane = self._lanes.live(sample.adapter, sample.adapter_id)
        if lane is None:  # its adapter was unmounted (and perhaps mounted again) while the request ran
            if (retired := self._lanes.find(sample.adapter)) is not None:
                retired.metrics.sample("skipped")
            return
        metrics = lane.metrics
        sequences = [fitted for s in sample.sequences if s.output_ids and (fitted := self._fit(s, metrics)) is not None]
        if not sequences:
            metrics.sample("skipped")
            return
        if self._closed:
            metrics.sample("dropped")
            return
        if self.scorer.state == "disabled":  # a remote reference that failed its checks (one not reachable: queued)
            metrics.sample("error")
            return
        if not self._queue.put(dataclasses.replace(sample, sequences=sequences), lane):
            metrics.sample("dropped")

    def _fit(self, seq: ShadowSequence, metrics: ShadowMetrics) -> ShadowSequence | None:
        """A sequence past the longest the reference takes: its first max-tokens tokens of
        prompt + output, so no forward exceeds the batch budget; None (skipped) when the
        prompt alone leaves no room for an output token."""
        budget = self._budgets()[0]
        if seq.tokens <= budget:
            return seq
        if len(seq.prompt_ids) >= budget:
            metrics.oversize("skipped")
            return None
        metrics.oversize("truncated")
        return seq.head(budget)

    def _budgets(self) -> tuple[int, int]:
        """(longest sequence, padded batch) a reference forward takes: the settings, within
        a remote reference's own caps (it would refuse more with 413)."""
        item_cap, batch_cap = self.scorer.token_caps
        sequence = min(self.settings.shadow_sequence_tokens, item_cap or self.settings.shadow_sequence_tokens)
        batch = min(self.settings.shadow_batch_tokens, batch_cap or self.settings.shadow_batch_tokens)
        return min(sequence, batch), batch

    def _lane_metrics(self, adapter: str) -> ShadowMetrics:
        """Where a batch's outcome is counted: its lane's series, live or retired (a batch
        is taken only from live lanes, and the worker's lock comes before any later
        retirement, so its lane cannot have been evicted; the base's as a last resort)."""
        lane = self._lanes.find(adapter)
        return lane.metrics if lane is not None else self.metrics

    def skip(self, adapter: str = BASE, outcome: str = "skipped") -> None:
        """A sampled request that was aborted or failed: nothing to compare (or `outcome`
        "error": one that could not be handed over)."""
        if (lane := self._lanes.find(adapter)) is not None:
            lane.metrics.sample(outcome)

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="shadow-worker")

    async def stop(self) -> None:
        """Stop taking samples, let the queue drain for `shadow_drain_s`, count the rest as dropped."""
        self._closed = True
        self._wake.set()
        try:
            await asyncio.wait_for(self._queue.join(), self.settings.shadow_drain_s)
        except TimeoutError:
            pass
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if left := self._queue.drop_everything(self._lanes, "dropped"):
            log.warning("shadow: %d samples left unscored at shutdown", left)
        await self.scorer.close()
        if self.capture is not None:
            self.capture.close()

    # --- the worker --------------------------------------------------------------

    async def run_reference_check(self, retry: bool = True) -> ReferenceCheck | None:
        """Run the self-check once (no-op without one, or when done). `retry`: a check that
        cannot run (the reference not reachable yet, a failed call) is retried with backoff
        until it can (the server); without it the failure is raised (verify)."""
        delay = 1.0
        while self._self_check is not None and self.reference_check is None:
            if retry and not self.scorer.ready:  # a remote reference not reachable yet: its watch says when it is
                await asyncio.sleep(READY_POLL_S)
                self._expire([])  # samples wait for the check, within their age
                continue
            try:
                if not self.scorer.ready:
                    raise ShadowReferenceError("the reference is not reachable yet")
                self._settle(await self._self_check())
            except Exception as exc:
                if not retry:
                    raise
                log.warning("shadow: the reference self-check could not run (%s); retrying in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 60.0)
                self._expire([])
        return self.reference_check

    def _settle(self, check: ReferenceCheck) -> None:
        self.reference_check = check
        if check.trusted:
            log.info("shadow: reference %s passed its self-check: %s", self.reference_name, check.summary())
            return
        log.error("shadow: REFUSING to judge against the reference %s (nothing is sampled): %s. %s",
                  self.reference_name, "; ".join(check.reasons), check.summary())
        self._queue.drop_everything(self._lanes, "skipped")  # taken before the refusal: nothing to compare them against

    async def _run(self) -> None:
        await self.run_reference_check()
        if self.refused:
            return
        while True:
            if (task := asyncio.current_task()) is not None and task.cancelling():
                raise asyncio.CancelledError  # a stop's cancel that asyncio.wait_for (3.11) swallowed
            batch = await self._queue.next_batch(self._lanes, self._budgets()[1])
            try:
                await self._work(batch)
            finally:
                self._queue.done(batch)
            await self._idle()

    async def _work(self, batch: list[ShadowSample]) -> None:
        """Score a batch and record it, retrying (with backoff) while the reference cannot
        answer; every sample ends in exactly one outcome. A batch that timed out
        TIMEOUT_TRIES times is an error: it is too large for --shadow-timeout-s (the
        reference would compute it in vain again), not an outage."""
        timeouts = 0
        while batch:
            metrics = self._lane_metrics(batch[0].adapter)
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
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    # asyncio.wait_for (3.11) can swallow a cancel that meets a failing call: shutdown wins
                    metrics.sample("dropped", len(batch))
                    raise asyncio.CancelledError from exc
                timeouts += isinstance(exc, TimeoutError)
                if timeouts >= TIMEOUT_TRIES:
                    log.warning("shadow: %d samples timed out %d times (--shadow-timeout-s %gs): errors; raise the "
                                "timeout or lower --shadow-batch-tokens", len(batch), timeouts,
                                self.settings.shadow_timeout_s)
                    metrics.sample("error", len(batch))
                    return
                metrics.retried()
                wait = self._backoff.delay(getattr(exc, "retry_after", None))
                log.warning("shadow: the reference could not score %d samples (%s); retrying in %.1fs", len(batch),
                            str(exc) or type(exc).__name__, wait)
                try:
                    await self._backoff_sleep(wait)
                except asyncio.CancelledError:  # shutdown during an outage
                    metrics.sample("dropped", len(batch))
                    raise
                batch = self._expire(batch)
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
            # Comparison, metrics and capture off the event loop: the server's requests share
            # it. Finished even if shutdown cancels us: the batch was scored.
            recorded = asyncio.ensure_future(asyncio.to_thread(self._record, batch, stats))
            try:
                await asyncio.shield(recorded)
            except asyncio.CancelledError:
                await recorded
                raise
            except Exception:  # _record counts per sample; this is a bug past that: keep going
                log.exception("shadow: recording a batch failed")
            return

    def _expire(self, batch: list[ShadowSample]) -> list[ShadowSample]:
        """While the reference cannot answer: the samples older than
        --shadow-max-sample-age-s, in `batch` and in the queue, are counted `error`; the
        rest of `batch` is returned, to be tried again."""
        oldest = time.monotonic() - self.settings.shadow_max_sample_age_s

        def expired(sample: ShadowSample) -> bool:
            return sample.finished_at < oldest

        for sample in self._queue.take(expired, self._lanes):
            self._lane_metrics(sample.adapter).sample("error")
        kept = [sample for sample in batch if not expired(sample)]
        if len(kept) < len(batch):
            self._lane_metrics(batch[0].adapter).sample("error", len(batch) - len(kept))
            log.warning("shadow: %d samples waited longer than --shadow-max-sample-age-s %gs for the reference: errors",
                        len(batch) - len(kept), self.settings.shadow_max_sample_age_s)
        return kept

    async def _idle(self) -> None:
        """Pay back the last forward's reference time so the reference computes at most a
        `shadow_max_duty` share of the time while the engine has requests; samples
        arriving meanwhile wait in the bounded queue or are dropped. The pause ends when
        the engine empties, and never starts while draining at shutdown."""
        busy, self._busy_s = self._busy_s, 0.0
        deadline = self._clock() + duty_idle_s(busy, self.settings.shadow_max_duty)
        while not self._closed and (left := deadline - self._clock()) > 0 and self._engine_busy():
            await self._sleep(left if self._engine_load is None else min(left, IDLE_POLL_S))

    def _engine_busy(self) -> bool:
        if self._engine_load is None:
            return True
        try:
            return self._engine_load() > 0
        except Exception:  # a signal that cannot be read: hold the reference back
            log.exception("shadow: the engine's load could not be read")
            return True

    def _throttle(self) -> None:
        """Before each forward: held back (confined threads) while the engine has
        requests, every core while it is idle."""
        held_back = self._engine_busy()
        if held_back == self._held_back:
            return
        self._held_back = held_back
        for lane in self._lanes:
            lane.metrics.throttled(held_back)
        throttle = getattr(self.scorer, "throttle", None)  # a local reference's threads; a remote one has none
        if throttle is not None:
            try:
                throttle(held_back)
            except Exception:
                log.exception("shadow: the reference's threads could not be set")

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    async def _process(self, batch: list[ShadowSample]) -> list[ScoredSequence]:
        """The reference's statistics for every sequence of the batch; raises what the
        reference raised (the caller decides what it means for the samples)."""
        items = [
            ScoreItem(seq.prompt_ids, seq.output_ids, seq.logprobs.candidate_ids())
            for sample in batch
            for seq in sample.sequences
        ]
        noise_top_k = self.top_k if self.noise_dtype is not None else None
        adapter = batch[0].adapter
        metrics = self._lane_metrics(adapter)
        stats: list[ScoredSequence] = []
        # A lone sample of several sequences can exceed the budget padded together: split it.
        for n, chunk in enumerate(_chunks(items, self._budgets()[1])):
            if n:
                await self._idle()
            self._throttle()
            started = self._clock()
            try:
                stats += await asyncio.wait_for(
                    self.scorer.score(chunk, self.settings.shadow_reference_top_m, noise_top_k, adapter or None),
                    self.settings.shadow_timeout_s if self.scorer.cancellable else None,
                )
            finally:
                self._busy_s = self._clock() - started
            metrics.reference_latency(self._busy_s)
        return stats

    def _record(self, batch: list[ShadowSample], stats: list[ScoredSequence]) -> None:
        margin = self.settings.shadow_near_tie_margin
        lane = self._lanes.find(batch[0].adapter)
        metrics = lane.metrics
        at = 0
        for sample in batch:
            scored = stats[at : at + len(sample.sequences)]
            at += len(sample.sequences)
            try:
                # The candidate, and the noise floor over the same positions, by the same maths.
                candidates = [seq.logprobs.to_dicts() for seq in sample.sequences]
                results = [
                    (compare_sequence(seq.output_ids, cand, s.reference, margin),
                     None if s.noise is None else compare_sequence(seq.output_ids, s.noise, s.reference, margin))
                    for seq, cand, s in zip(sample.sequences, candidates, scored)
                ]
            except Exception as exc:  # ComparisonError, or a malformed reply that slipped through
                log.warning("shadow: sample %s not comparable: %s", sample.request_id, exc)
                metrics.sample("error")
                continue
            for index, (seq, cand, s, (candidate, noise)) in enumerate(zip(sample.sequences, candidates, scored, results)):
                metrics.sequence(candidate)
                if noise is not None:
                    metrics.sequence(noise, NOISE_FLOOR)
                lane.history.add(ComparedSequence(time.time(), sample.request_id, candidate, noise, tuple(seq.output_ids)))
                if self.capture is not None and candidate.first_divergence is not None:
                    self._capture(sample, index, seq, cand, s, candidate)
            metrics.sample("compared")
            metrics.sample_age(time.monotonic() - sample.finished_at)
        if self._lanes.live(lane.adapter) is not lane:  # unmounted while it was scored: no verdict to publish
            return
        try:
            self.publish_verdict(lane.adapter)
        except Exception:  # the gauges keep their last value; the endpoint still answers
            log.exception("shadow: the verdict could not be published")

    def _capture(self, sample, index: int, seq: ShadowSequence, cand: list[dict[int, float]], scored: ScoredSequence,
                 result: SequenceComparison) -> None:
        try:
            self.capture.write(
                request_id=sample.request_id, model=sample.model, reference=self.reference_name, sequence=index,
                prompt_ids=seq.prompt_ids, output_ids=seq.output_ids, candidate=cand,
                reference_stats=scored.reference, comparison=result,
            )
        except Exception as exc:  # a full disk or a decode error must not lose the metrics
            log.warning("shadow: capture failed: %s", exc)


def _bound(value: float | None, sign: int) -> float:
    return sign * float("inf") if value is None else value


def _chunks(items: list[ScoreItem], budget: int) -> list[list[ScoreItem]]:
    """Consecutive runs of items whose padded size (items x longest) fits `budget`."""
    chunks: list[list[ScoreItem]] = []
    chunk: list[ScoreItem] = []
    longest = 0
    for item in items:
        size = len(item.prompt_ids) + len(item.output_ids)
        if chunk and ((len(chunk) + 1) * max(longest, size) > budget or len(chunk) >= MAX_BATCH_SEQUENCES):
            chunks.append(chunk)
            chunk, longest = [], 0
        chunk.append(item)
        longest = max(longest, size)
    return [*chunks, chunk] if chunk else chunks


def duty_idle_s(busy_s: float, duty: float) -> float:
    """Idle after `busy_s` of reference work so that busy / (busy + idle) = duty."""
    return max(busy_s, 0.0) * (1.0 - duty) / duty
