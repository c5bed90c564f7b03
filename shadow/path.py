"""The shadow path: `ShadowPath`, the facade the server holds, and admission: `admit`
decides per request (unsampled requests pay nothing), `submit` never blocks or raises (a
full queue drops and counts). Behind it: the worker (shadow/worker.py: the reference's
self-check, then batches scored and retried through an outage, every failure an
outcome), the throttle (shadow/throttle.py: the reference uses the engine's idle
capacity) and recording (shadow/recording.py: comparisons, history, capture, gauges).

Requests on mounted LoRA adapters are shadowed per adapter (shadow/lanes.py), with the
adapter applied unmerged on the reference; `add_adapter` / `remove_adapter` mount and
unmount one at run time. One it cannot apply is served unshadowed; its verdict says why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable

from shadow.calibration import Calibration
from shadow.capture import DivergenceCapture
from shadow.history import History
from shadow.lanes import BASE, Lane, Lanes
from shadow.metrics import ShadowMetrics
from shadow.queue import SampleQueue, ShadowSample, ShadowSequence
from shadow.recording import Recorder, publish
from shadow.reference_check import ReferenceCheck
from shadow.report import ShadowReport, build_report, verdict_of
from shadow.scoring import AdapterUnavailableError, Scorer, ShadowReferenceError
from shadow.settings import ShadowSettings
from shadow.throttle import Throttle
from shadow.worker import Worker

__all__ = ["ShadowHeaderError", "ShadowPath"]

log = logging.getLogger(__name__)

HEADER_VALUES = ("always", "never")


class ShadowHeaderError(ValueError):
    """An `X-Shadow` value other than always/never (a client error)."""


class ShadowPath:
    def __init__(self, settings: ShadowSettings, scorer: Scorer, metrics: ShadowMetrics,
                 capture: DivergenceCapture | None = None, rng: random.Random | None = None, *,
                 model_name: str = "candidate", reference_name: str | None = None,
                 self_check: Callable[[], Awaitable[ReferenceCheck]] | None = None,
                 calibration: Calibration | None = None, engine_load: Callable[[], int] | None = None):
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
        self._task: asyncio.Task | None = None
        self._scoring = asyncio.Lock()  # a batch being scored, or an adapter being (un)mounted on the reference
        self._closed = False
        self.calibration = calibration
        self._throttle = Throttle(settings, scorer, self._lanes, engine_load)
        recorder = Recorder(settings, self._lanes, capture, self.reference_name, self.publish_verdict)
        self._worker = Worker(settings, scorer, self._queue, self._lanes, self._throttle, recorder,
                              scoring=self._scoring, batch_tokens=lambda: self._budgets()[1],
                              noise_top_k=lambda: self.top_k if self.noise_dtype is not None else None,
                              unshadow=self._unshadow, self_check=self_check, reference_name=self.reference_name)

    # The throttle's clock, pause and load signal, the worker's backoff wait: for tests.
    _clock = property(lambda self: self._throttle.clock, lambda self, f: setattr(self._throttle, "clock", f))
    _sleep = property(lambda self: self._throttle.sleep, lambda self, f: setattr(self._throttle, "sleep", f))
    _engine_busy = property(lambda self: self._throttle.engine_busy)
    _backoff_sleep = property(lambda self: self._worker.backoff_sleep,
                              lambda self, f: setattr(self._worker, "backoff_sleep", f))

    @property
    def reference_check(self) -> ReferenceCheck | None:
        """The reference's self-check; None: not (yet) checked, or no check."""
        return self._worker.reference_check

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
            lane.history.snapshot(window_s), model=self.model_name, reference=self.reference_name, window_s=window_s,
            evicted=lane.history.evicted, with_trajectory=with_trajectory, **self._judging(lane),
        )
        report.adapter = adapter
        return report

    def publish_verdict(self, adapter: str = BASE) -> None:
        """A lane's verdict over everything kept, as gauges (CPU work: off the event loop).
        The verdict alone: no percentiles, which only a report read computes."""
        lane = self._lanes.live(adapter)
        records = lane.history.snapshot()
        publish(lane.metrics, verdict_of(records, **self._judging(lane)), len(records))

    def _judging(self, lane: Lane) -> dict:
        """What a lane's verdict is judged with, besides its records (report and gauges alike)."""
        return dict(noise_dtype=self.noise_dtype, policy=self.settings.verdict_policy,
                    reference_check=self.reference_check, calibration=self.calibration, unshadowed=lane.unshadowed)

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
                lane.metrics.throttled(bool(self._throttle.held_back))
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

    def skip(self, adapter: str = BASE, outcome: str = "skipped") -> None:
        """A sampled request that was aborted or failed: nothing to compare (or `outcome`
        "error": one that could not be handed over)."""
        if (lane := self._lanes.find(adapter)) is not None:
            lane.metrics.sample(outcome)

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._worker.run(), name="shadow-worker")

    async def stop(self) -> None:
        """Stop taking samples, let the queue drain for `shadow_drain_s`, count the rest as dropped."""
        self._closed = True
        self._throttle.stop()
        try:
            await asyncio.wait_for(self._queue.join(), self.settings.shadow_drain_s)
        except TimeoutError:
            pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if left := self._queue.drop_everything(self._lanes, "dropped"):
            log.warning("shadow: %d samples left unscored at shutdown", left)
        await self.scorer.close()
        if self.capture is not None:
            self.capture.close()

    async def run_reference_check(self, retry: bool = True) -> ReferenceCheck | None:
        """Run the reference's self-check once (no-op without one, or when done). `retry`:
        a check that cannot run (the reference not reachable yet, a failed call) is retried
        with backoff until it can (the server); without it the failure is raised (verify)."""
        return await self._worker.check_reference(retry)
