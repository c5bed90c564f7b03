"""Recording a scored batch: each sequence compared with the reference (and the noise
floor over the same positions, by the same maths), counted in its lane's metrics, kept in
its history and, when it diverged, captured; then the lane's verdict is published.

The verdict's gauges are set from the verdict itself (shadow/report.py `verdict_of`):
the statistics' percentiles are computed only when a report is read (the endpoint,
`verify`), not after every batch.
"""

from __future__ import annotations

import logging
import math
import time

from shadow.capture import DivergenceCapture
from shadow.compare import SequenceComparison, compare_sequence
from shadow.history import ComparedSequence
from shadow.lanes import Lane, Lanes
from shadow.metrics import NOISE_FLOOR, ShadowMetrics
from shadow.queue import ShadowSample, ShadowSequence
from shadow.report import Judgement
from shadow.scoring import ScoredSequence
from shadow.settings import ShadowSettings
from shadow.verdict import CHECKS, Verdict

log = logging.getLogger(__name__)


def publish(metrics: ShadowMetrics, judgement: Judgement, sequences: int) -> None:
    """A verdict over `sequences` compared sequences as its lane's gauges."""
    verdict = judgement.verdict
    metrics.verdict(verdict.status, bool(verdict.different), gauge_bounds(verdict), sequences, judgement.kl_scale)


def gauge_bounds(verdict: Verdict) -> dict[str, tuple[float, float, float]]:
    """statistic -> (estimate, low, high), a bound the data cannot set yet (not finite) at
    -inf / +inf; a statistic not judged is left out (its gauges read NaN)."""
    return {name: (i.estimate, _finite(i.low, -1), _finite(i.high, 1))
            for name in CHECKS if (i := getattr(verdict, name)) is not None}


def _finite(value: float, sign: int) -> float:
    return value if math.isfinite(value) else sign * math.inf


class Recorder:
    def __init__(self, settings: ShadowSettings, lanes: Lanes, capture: DivergenceCapture | None, reference_name: str,
                 publish_verdict) -> None:
        """`publish_verdict(adapter)`: sets a live lane's verdict gauges (the path's)."""
        self._settings = settings
        self._lanes = lanes
        self._capture_to = capture
        self._reference_name = reference_name
        self._publish_verdict = publish_verdict

    def record(self, batch: list[ShadowSample], stats: list[ScoredSequence]) -> None:
        """One batch of one lane, scored: every sample ends `compared` or `error`. CPU work:
        off the event loop."""
        lane = self._lanes.find(batch[0].adapter)
        at = 0
        for sample in batch:
            scored = stats[at : at + len(sample.sequences)]
            at += len(sample.sequences)
            self._sample(lane, sample, scored)
        if self._lanes.live(lane.adapter) is not lane:  # unmounted while it was scored: no verdict to publish
            return
        try:
            self._publish_verdict(lane.adapter)
        except Exception:  # the gauges keep their last value; the endpoint still answers
            log.exception("shadow: the verdict could not be published")

    def _sample(self, lane: Lane, sample: ShadowSample, scored: list[ScoredSequence]) -> None:
        margin = self._settings.shadow_near_tie_margin
        metrics = lane.metrics
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
            return
        for index, (seq, cand, s, (candidate, noise)) in enumerate(zip(sample.sequences, candidates, scored, results)):
            metrics.sequence(candidate)
            if noise is not None:
                metrics.sequence(noise, NOISE_FLOOR)
            lane.history.add(ComparedSequence(time.time(), sample.request_id, candidate, noise, tuple(seq.output_ids)))
            if self._capture_to is not None and candidate.first_divergence is not None:
                self._capture(sample, index, seq, cand, s, candidate)
        metrics.sample("compared")
        metrics.sample_age(time.monotonic() - sample.finished_at)

    def _capture(self, sample: ShadowSample, index: int, seq: ShadowSequence, cand: list[dict[int, float]],
                 scored: ScoredSequence, result: SequenceComparison) -> None:
        try:
            self._capture_to.write(
                request_id=sample.request_id, model=sample.model, reference=self._reference_name, sequence=index,
                prompt_ids=seq.prompt_ids, output_ids=seq.output_ids, candidate=cand,
                reference_stats=scored.reference, comparison=result,
            )
        except Exception as exc:  # a full disk or a decode error must not lose the metrics
            log.warning("shadow: capture failed: %s", exc)
