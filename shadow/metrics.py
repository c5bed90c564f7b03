"""Shadow metrics (docs/design.md, "Metrics"; docs/reference/metrics.md lists every series) on an injected CollectorRegistry.

Every series carries `model`, `reference`, the operator's constant labels (e.g.
`variant="canary"`) and `adapter`: the mounted LoRA adapter the requests named, `""` for
the base model (each adapter is its own candidate, with its own verdict; `for_adapter`
gives its series, sharing the collectors); comparison series also carry `comparison`: "candidate" (the served
model vs the fp32 reference) and, with the noise floor on, "noise_floor" (the reference
in the serving dtype vs itself in fp32, over the same positions), so every PromQL ratio
between the two is paired.
Per-token histograms let a dashboard compute llama.cpp's statistics live: the mean
from _sum/_count, quantiles with histogram_quantile.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shadow.compare import SequenceComparison
from shadow.verdict import CHECKS

# Log-spaced 1-2-5 edges: quantiles readable from 1e-7 to 20 nats.
_NATS = tuple(round(m * 10.0**e, 12) for e in range(-7, 1) for m in (1, 2, 5)) + (10.0, 20.0, 50.0)
# Symmetric around 0 for p_cand - p_ref; the negative tail is the one that hurts.
_POSITIVE_P = (1e-5, 1e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
_DELTA_P = tuple(-x for x in reversed(_POSITIVE_P)) + (0.0,) + _POSITIVE_P
_POSITIONS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048, 4096)
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# A sample's wait, from its request's end to its comparison: seconds to an hour.
_AGE = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)

OUTCOMES = ("compared", "dropped", "skipped", "error")
STATE = {"fail": -1, "inconclusive": 0, "pass": 1}  # shadow_verdict_state
BOUNDS = ("estimate", "low", "high")
RESULTS = ("identical", "near_tie", "hard")
OVERSIZE = ("truncated", "skipped")  # a sequence past --shadow-max-tokens: cut to it, or no output token fits
CANDIDATE, NOISE_FLOOR = "candidate", "noise_floor"


class _SequenceSeries:
    """The children `ShadowMetrics.sequence` updates for one label set (adapter,
    comparison), bound once: `.labels()` checks and looks up the label values under the
    collector's lock at every call, a dozen times per sequence. The children every
    sequence touches are bound at once; those only some touch (its result's, the first
    divergence's) on first use, so series are created when `.labels()` created them."""

    def __init__(self, metrics: ShadowMetrics, labels: dict[str, str]):
        self._metrics, self._labels = metrics, labels
        self._results: dict[str, Counter] = {}
        self._first_divergence: Histogram | None = None
        self.compared_len = metrics._compared_len.labels(**labels)
        self.same = metrics._tokens.labels(**labels, top1="same")
        self.different = metrics._tokens.labels(**labels, top1="different")
        self.kl = metrics._kl.labels(**labels)
        self.delta_p = metrics._delta_p.labels(**labels)
        self.drift = metrics._drift.labels(**labels)
        self.delta_p_gain = metrics._delta_p_gain.labels(**labels)
        self.delta_p_loss = metrics._delta_p_loss.labels(**labels)
        self.delta_p_squares = metrics._delta_p_squares.labels(**labels)

    def result(self, result: str) -> Counter:
        child = self._results.get(result)
        if child is None:
            child = self._results[result] = self._metrics._sequences.labels(**self._labels, result=result)
        return child

    def first_divergence(self) -> Histogram:
        if self._first_divergence is None:
            self._first_divergence = self._metrics._first_divergence.labels(**self._labels)
        return self._first_divergence


class _Declare:
    """Collectors on one registry, each labelled by the common names (+ its own)."""

    def __init__(self, registry: CollectorRegistry, names: list[str]):
        self.registry, self.names = registry, names

    def counter(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, [*self.names, *extra], registry=self.registry)

    def histogram(self, name: str, doc: str, buckets, extra: tuple[str, ...] = ()) -> Histogram:
        return Histogram(name, doc, [*self.names, *extra], buckets=buckets, registry=self.registry)

    def gauge(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, doc, [*self.names, *extra], registry=self.registry)


class ShadowMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        model: str,
        reference: str,
        const_labels: Mapping[str, str] | None = None,
        comparisons: tuple[str, ...] = (CANDIDATE,),
        adapter: str = "",
    ):
        common = {"model": model, "reference": reference, **(const_labels or {})}
        make = _Declare(registry, [*common, "adapter"])
        self._declare_comparisons(make)
        self._declare_reference(make)
        self._declare_verdict(make)
        self._common = common
        self._comparisons = comparisons
        self._registry = registry
        # (label values of adapter + comparison) -> its bound per-sequence children; one
        # dict shared by every adapter's view (copy.copy keeps it), as the collectors are.
        self._sequence_series: dict[tuple[str, ...], _SequenceSeries] = {}
        self._bind(adapter)

    def _declare_comparisons(self, make: _Declare) -> None:
        """Samples by outcome; per compared sequence and token, by comparison (the candidate, the noise floor)."""
        cmp = ("comparison",)
        self._samples = make.counter(
            "shadow_samples", "Shadow samples by outcome: compared, dropped (queue full), skipped, error.", ("outcome",))
        self._sampled = make.counter(
            "shadow_sampled", "Requests admitted to the shadow path; each ends as exactly one shadow_samples_total outcome.")
        self._sequences = make.counter("shadow_sequences", "Compared sequences by result: identical, near_tie, hard.", (*cmp, "result"))
        self._first_divergence = make.histogram(
            "shadow_first_divergence_position_tokens", "First divergence position of diverged sequences.", _POSITIONS, cmp)
        self._compared_len = make.histogram(
            "shadow_compared_sequence_tokens", "Compared length of every sequence.", _POSITIONS, cmp)
        self._tokens = make.counter("shadow_tokens", "Compared positions by top-1 agreement (same/different).", (*cmp, "top1"))
        self._kl = make.histogram(
            "shadow_token_kl_divergence",
            "Per token KL(ref||cand) over the candidate's top-k + rest (a lower bound of the full KL), nats.", _NATS, cmp)
        self._delta_p = make.histogram(
            "shadow_token_delta_p", "Per token p_cand - p_ref of the emitted token.", _DELTA_P, cmp)
        # prometheus_client omits _sum for a histogram with negative buckets, so the mean
        # and RMS of Δp (llama.cpp's statistics) come from these counters instead:
        # mean = (gain - loss) / count, RMS = sqrt(squares / count); restart-safe as counters.
        self._delta_p_gain = make.counter("shadow_token_delta_p_gain", "Sum over tokens of max(delta_p, 0).", cmp)
        self._delta_p_loss = make.counter("shadow_token_delta_p_loss", "Sum over tokens of max(-delta_p, 0).", cmp)
        self._delta_p_squares = make.counter("shadow_token_delta_p_squares", "Sum over tokens of delta_p squared.", cmp)
        self._drift = make.histogram(
            "shadow_token_logprob_drift", "Per token max |logprob_cand - logprob_ref| over the candidate's top-k, nats.", _NATS, cmp)

    def _declare_reference(self, make: _Declare) -> None:
        """Samples, the queue, the reference's latency, reachability and throttle."""
        self._oversize = make.counter(
            "shadow_oversize_sequences",
            "Sequences longer than the reference's sequence budget: truncated to it, or skipped (no output token fits).",
            ("action",))
        self._queue_depth = make.gauge("shadow_queue_depth", "Samples waiting for the reference.")
        self._queue_tokens = make.gauge(
            "shadow_queue_tokens", "Prompt + output tokens waiting for the reference.")
        self._reference_seconds = make.histogram("shadow_reference_seconds", "Reference scoring latency per batch.", _SECONDS)
        # Coverage and lag: how long samples wait, and whether the reference is held back.
        self._sample_age = make.histogram(
            "shadow_sample_age_seconds", "Time from a sampled request's end to its comparison, per compared sample.", _AGE)
        self._oldest_age = make.gauge(
            "shadow_queue_oldest_age_seconds", "Age of the oldest sample waiting for the reference (0: none waits).")
        self._reference_up = make.gauge(
            "shadow_reference_up",
            "1 while the reference can be reached, 0 while it cannot (a remote one refusing connections, not answering its "
            "probe, a proxy answering 502-504, or back and not yet re-checked): sampled requests then wait in the queue and "
            "are retried. A slow or busy reference reads 1; its retries count.")
        self._retries = make.counter(
            "shadow_reference_retries",
            "Reference calls tried again because the reference could not answer (unreachable, timed out, 429, 502-504, "
            "busy); their samples stay queued until --shadow-max-sample-age-s.")
        self._throttled = make.gauge(
            "shadow_reference_throttled",
            "1 while the engine holds requests and the reference is held back (its duty cap; a local one's confined "
            "thread); 0 while the engine is idle and it runs free.")

    def _declare_verdict(self, make: _Declare) -> None:
        """The verdict itself (shadow/verdict.py), over everything the server keeps: what the
        endpoint says, so alerts and canary gates decide on the same judgement."""
        self._verdict_state = make.gauge(
            "shadow_verdict_state", "The verdict: 1 pass, 0 inconclusive, -1 fail (anytime-valid; GET /v1/shadow/verdict).")
        self._verdict_different = make.gauge(
            "shadow_verdict_different",
            "1 when the candidate is detectably different from the noise floor (a contrast at the floor itself is proven above 0), else 0.")
        self._verdict_bound = make.gauge(
            "shadow_verdict_interval",
            "The verdict's statistics with their confidence-sequence bounds (+-Inf: not bounded yet; NaN: no verdict).",
            extra=("statistic", "bound"))
        self._verdict_sequences = make.gauge(
            "shadow_verdict_sequences", "Compared sequences the verdict is computed over.")
        self._verdict_floor_scale = make.gauge(
            "shadow_verdict_floor_kl_scale", "The noise floor's KL scale: 1 uncalibrated, else the engine calibration's ratio.")

    def for_adapter(self, adapter: str) -> ShadowMetrics:
        """The series of requests on mounted adapter `adapter` (same collectors, its own children)."""
        view = copy.copy(self)
        view._bind(adapter)
        return view

    def recreate(self) -> None:
        """This adapter's series back at their start values (gauges), or as they were (counters)."""
        self._bind(self.adapter)

    def _bind(self, adapter: str) -> None:
        """Create this adapter's children now, so series exist (at 0) before the first
        event: rate() and absent() behave from the first scrape."""
        self.adapter = adapter
        self._base = base = {**self._common, "adapter": adapter}
        for metric, labels in self._children():
            metric.labels(**labels)
        self._queue_depth.labels(**base).set(0)
        self._queue_tokens.labels(**base).set(0)
        self._oldest_age.labels(**base).set(0)
        self._throttled.labels(**base).set(0)
        self.verdict("inconclusive", False, {}, 0, 1.0)

    def _children(self):
        """Every (collector, labels) child of this adapter's series."""
        base = self._base
        yield self._sampled, base
        yield self._retries, base
        for outcome in OUTCOMES:
            yield self._samples, {**base, "outcome": outcome}
        for comparison in self._comparisons:
            labels = {**base, "comparison": comparison}
            for result in RESULTS:
                yield self._sequences, {**labels, "result": result}
            for top1 in ("same", "different"):
                yield self._tokens, {**labels, "top1": top1}
            for metric in (self._first_divergence, self._compared_len, self._kl, self._delta_p, self._drift,
                           self._delta_p_gain, self._delta_p_loss, self._delta_p_squares):
                yield metric, labels
        for action in OVERSIZE:
            yield self._oversize, {**base, "action": action}
        for metric in (self._queue_depth, self._queue_tokens, self._reference_seconds, self._sample_age,
                       self._oldest_age, self._reference_up, self._throttled, self._verdict_state, self._verdict_different,
                       self._verdict_sequences, self._verdict_floor_scale):
            yield metric, base
        for statistic in CHECKS:
            for bound in BOUNDS:
                yield self._verdict_bound, {**base, "statistic": statistic, "bound": bound}

    def remove(self, gauges_only: bool = False) -> None:
        """Drop this adapter's series: all of them (an adapter retired long enough, or one
        that never served), or only its gauges (just unloaded: its verdict and queue say
        nothing any more, so alerts and canary gates must not read them; its counters
        stay readable)."""
        # Children removed from their collector are detached: the next sequence binds anew
        # (as `.labels()` recreated them).
        prefix = tuple(self._base.values())
        for key in [key for key in self._sequence_series if key[:-1] == prefix]:
            del self._sequence_series[key]
        for metric, labels in list(self._children()):  # labels in declaration order (dicts keep it)
            if gauges_only and not isinstance(metric, Gauge):
                continue
            try:
                metric.remove(*labels.values())
            except KeyError:  # never created, or removed already
                pass

    def outcomes(self) -> dict[str, float]:
        """Samples so far by outcome (compared, dropped, skipped, error)."""
        return {o: self._registry.get_sample_value("shadow_samples_total", {**self._base, "outcome": o}) or 0.0
                for o in OUTCOMES}

    def admitted(self) -> None:
        self._sampled.labels(**self._base).inc()

    def sample(self, outcome: str, count: int = 1) -> None:
        self._samples.labels(**self._base, outcome=outcome).inc(count)

    def queue_depth(self, depth: int, tokens: int = 0) -> None:
        self._queue_depth.labels(**self._base).set(depth)
        self._queue_tokens.labels(**self._base).set(tokens)

    def oldest_age_from(self, age: Callable[[], float]) -> None:
        """The oldest queued sample's age, read at each scrape (it grows between events)."""
        self._oldest_age.labels(**self._base).set_function(age)

    def reference_up_from(self, up: Callable[[], float]) -> None:
        """Whether the reference answers, read at each scrape."""
        self._reference_up.labels(**self._base).set_function(up)

    def retried(self) -> None:
        self._retries.labels(**self._base).inc()

    def sample_age(self, seconds: float) -> None:
        self._sample_age.labels(**self._base).observe(seconds)

    def throttled(self, held_back: bool) -> None:
        self._throttled.labels(**self._base).set(int(held_back))

    def verdict(self, status: str, different: bool, bounds: Mapping[str, tuple[float, float, float]],
                sequences: int, floor_scale: float) -> None:
        """`bounds`: statistic -> (estimate, low, high); a missing statistic reads NaN."""
        self._verdict_state.labels(**self._base).set(STATE[status])
        self._verdict_different.labels(**self._base).set(int(different))
        self._verdict_sequences.labels(**self._base).set(sequences)
        self._verdict_floor_scale.labels(**self._base).set(floor_scale)
        for statistic in CHECKS:
            values = bounds.get(statistic, (float("nan"),) * 3)
            for bound, value in zip(BOUNDS, values):
                self._verdict_bound.labels(**self._base, statistic=statistic, bound=bound).set(value)

    def oversize(self, action: str) -> None:
        self._oversize.labels(**self._base, action=action).inc()

    def reference_latency(self, seconds: float) -> None:
        self._reference_seconds.labels(**self._base).observe(seconds)

    def _series_of(self, comparison: str) -> _SequenceSeries:
        """This adapter's `comparison` children, bound on its first sequence."""
        labels = {**self._base, "comparison": comparison}
        key = tuple(labels.values())
        series = self._sequence_series.get(key)
        if series is None:
            series = self._sequence_series[key] = _SequenceSeries(self, labels)
        return series

    def sequence(self, cmp: SequenceComparison, comparison: str = CANDIDATE) -> None:
        series = self._series_of(comparison)
        series.result(cmp.result).inc()
        series.compared_len.observe(cmp.compared_tokens)
        if cmp.first_divergence is not None:
            series.first_divergence().observe(cmp.first_divergence)
        same = int(np.count_nonzero(cmp.tokens.top1_same))
        series.same.inc(same)
        series.different.inc(cmp.compared_tokens - same)
        for child, values in ((series.kl, cmp.tokens.kl), (series.delta_p, cmp.tokens.delta_p), (series.drift, cmp.tokens.drift)):
            for value in values.tolist():
                child.observe(value)
        dp = cmp.tokens.delta_p
        series.delta_p_gain.inc(float(np.clip(dp, 0, None).sum()))
        series.delta_p_loss.inc(float(np.clip(-dp, 0, None).sum()))
        series.delta_p_squares.inc(float(np.square(dp).sum()))
