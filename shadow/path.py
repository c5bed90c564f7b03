"""The shadow path: admission sampling, a bounded queue, and one worker that batches
samples, scores them on the reference and records the comparison.

Nothing here can reach a client: `submit` never blocks or raises (a full queue drops
and counts), and every reference failure becomes an `error` outcome.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

from shadow.capture import DivergenceCapture
from shadow.compare import SequenceComparison, compare_sequence
from shadow.history import ComparedSequence, History
from shadow.metrics import NOISE_FLOOR, ShadowMetrics
from shadow.report import ShadowReport, build_report
from shadow.scoring import MAX_BATCH_SEQUENCES, ScoredSequence, ScoreItem, Scorer
from shadow.settings import ShadowSettings

log = logging.getLogger(__name__)

HEADER_VALUES = ("always", "never")


class ShadowHeaderError(ValueError):
    """An `X-Shadow` value other than always/never (a client error)."""


@dataclass(frozen=True)
class ShadowSequence:
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[dict[int, float]]  # candidate's raw top-k (+ emitted token) per position


@dataclass(frozen=True)
class ShadowSample:
    request_id: str
    model: str
    sequences: list[ShadowSequence]


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
    ):
        self.settings = settings
        self.scorer = scorer
        self.metrics = metrics
        self.capture = capture
        self.model_name = model_name
        self.reference_name = reference_name or scorer.name
        self.history = History(settings.shadow_verdict_max_sequences)
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[ShadowSample] = asyncio.Queue(settings.shadow_queue_size)
        self._worker: asyncio.Task | None = None
        self._carry: ShadowSample | None = None  # taken from the queue, waiting for the next batch
        self._closed = False

    @property
    def top_k(self) -> int:
        return self.settings.shadow_top_k

    @property
    def noise_dtype(self) -> str | None:
        """The serving dtype the noise floor is computed in; None when it is off."""
        return self.scorer.noise_dtype if self.settings.shadow_noise_floor else None

    def report(self, window_s: float | None = None, with_trajectory: bool = False) -> ShadowReport:
        """The verdict and its statistics over the sequences of the last `window_s`
        seconds (all that are kept when None). CPU work: call it off the event loop."""
        return build_report(
            self.history.snapshot(window_s), model=self.model_name, reference=self.reference_name,
            noise_dtype=self.noise_dtype, policy=self.settings.verdict_policy, window_s=window_s,
            evicted=self.history.evicted, with_trajectory=with_trajectory,
        )

    # --- the request side: cheap and non-blocking ---------------------------------

    def admit(self, header: str | None = None) -> bool:
        """Decide at admission, so unsampled requests pay nothing."""
        if header is not None and self.settings.shadow_allow_header:
            value = header.strip().lower()
            if value not in HEADER_VALUES:
                raise ShadowHeaderError(f"X-Shadow must be one of {', '.join(HEADER_VALUES)}")
            return value == "always"
        rate = self.settings.shadow_rate
        return rate > 0 and (rate >= 1 or self._rng.random() < rate)

    def submit(self, sample: ShadowSample) -> None:
        sequences = [s for s in sample.sequences if s.output_ids]
        if not sequences:
            self.metrics.sample("skipped")
            return
        if self._closed:
            self.metrics.sample("dropped")
            return
        try:
            self._queue.put_nowait(ShadowSample(sample.request_id, sample.model, sequences))
        except asyncio.QueueFull:
            self.metrics.sample("dropped")
        self.metrics.queue_depth(self._queue.qsize())

    def skip(self) -> None:
        """A sampled request that was aborted or failed: nothing to compare."""
        self.metrics.sample("skipped")

    # --- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="shadow-worker")

    async def stop(self) -> None:
        """Stop taking samples, let the queue drain for `shadow_drain_s`, count the rest as dropped."""
        self._closed = True
        try:
            await asyncio.wait_for(self._queue.join(), self.settings.shadow_drain_s)
        except TimeoutError:
            pass
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        left = self._queue.qsize() + (self._carry is not None)
        if left:
            log.warning("shadow: %d samples left unscored at shutdown", left)
            self.metrics.sample("dropped", left)
        self.metrics.queue_depth(0)
        await self.scorer.close()
        if self.capture is not None:
            self.capture.close()

    # --- the worker --------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                recorded = await self._process(batch)
            except asyncio.CancelledError:  # shutdown ran out of drain time before scoring ended
                self.metrics.sample("dropped", len(batch))
                raise
            except Exception:  # never let one bad batch stop the worker
                log.exception("shadow: batch failed")
                self.metrics.sample("error", len(batch))
            else:
                if recorded is not None:  # scored: finish the bookkeeping even if shutdown cancels us
                    try:
                        await asyncio.shield(recorded)
                    except asyncio.CancelledError:
                        await recorded
                        raise
            finally:
                for _ in batch:
                    self._queue.task_done()
                self.metrics.queue_depth(self._queue.qsize() + (self._carry is not None))

    async def _next_batch(self) -> list[ShadowSample]:
        """Wait for one sample, then take whatever else is queued while the batch's padded
        size (sequences x longest sequence: what the reference's logits cost) fits the
        token budget. A sample that does not fit is carried over to open the next batch."""
        first, self._carry = self._carry or await self._queue.get(), None
        batch = [first]
        while not self._queue.empty():
            nxt = self._queue.get_nowait()
            if _padded_tokens([*batch, nxt]) > self.settings.shadow_batch_tokens or \
                    sum(len(s.sequences) for s in (*batch, nxt)) > MAX_BATCH_SEQUENCES:
                self._carry = nxt
                break
            batch.append(nxt)
        return batch

    async def _process(self, batch: list[ShadowSample]) -> asyncio.Future | None:
        """Score the batch; return the (shielded) recording of its results, or None when
        the reference failed and the batch was counted as errors."""
        items = [
            ScoreItem(seq.prompt_ids, seq.output_ids, [list(entry) for entry in seq.logprobs])
            for sample in batch
            for seq in sample.sequences
        ]
        noise_top_k = self.top_k if self.noise_dtype is not None else None
        started = time.perf_counter()
        try:
            stats = await asyncio.wait_for(
                self.scorer.score(items, self.settings.shadow_reference_top_m, noise_top_k), self.settings.shadow_timeout_s
            )
        except Exception as exc:
            log.warning("shadow: reference failed on %d samples: %s", len(batch), exc or type(exc).__name__)
            self.metrics.sample("error", len(batch))
            return None
        self.metrics.reference_latency(time.perf_counter() - started)
        # Comparison, metrics and capture off the event loop: the server's requests share it.
        return asyncio.ensure_future(asyncio.to_thread(self._record, batch, stats))

    def _record(self, batch: list[ShadowSample], stats: list[ScoredSequence]) -> None:
        margin = self.settings.shadow_near_tie_margin
        at = 0
        for sample in batch:
            scored = stats[at : at + len(sample.sequences)]
            at += len(sample.sequences)
            try:
                # The candidate, and the noise floor over the same positions, by the same maths.
                results = [
                    (compare_sequence(seq.output_ids, seq.logprobs, s.reference, margin),
                     None if s.noise is None else compare_sequence(seq.output_ids, s.noise, s.reference, margin))
                    for seq, s in zip(sample.sequences, scored)
                ]
            except Exception as exc:  # ComparisonError, or a malformed reply that slipped through
                log.warning("shadow: sample %s not comparable: %s", sample.request_id, exc)
                self.metrics.sample("error")
                continue
            for index, (seq, s, (candidate, noise)) in enumerate(zip(sample.sequences, scored, results)):
                self.metrics.sequence(candidate)
                if noise is not None:
                    self.metrics.sequence(noise, NOISE_FLOOR)
                self.history.add(ComparedSequence(time.time(), sample.request_id, candidate, noise, tuple(seq.output_ids)))
                if self.capture is not None and candidate.first_divergence is not None:
                    self._capture(sample, index, seq, s, candidate)
            self.metrics.sample("compared")

    def _capture(self, sample, index: int, seq: ShadowSequence, scored: ScoredSequence, result: SequenceComparison) -> None:
        try:
            self.capture.write(
                request_id=sample.request_id, model=sample.model, reference=self.reference_name, sequence=index,
                prompt_ids=seq.prompt_ids, output_ids=seq.output_ids, candidate=seq.logprobs,
                reference_stats=scored.reference, comparison=result,
            )
        except Exception as exc:  # a full disk or a decode error must not lose the metrics
            log.warning("shadow: capture failed: %s", exc)


def _padded_tokens(batch: list[ShadowSample]) -> int:
    lengths = [len(s.prompt_ids) + len(s.output_ids) for sample in batch for s in sample.sequences]
    return len(lengths) * max(lengths)
