"""The report behind `GET /v1/shadow/verdict` and `shadowserve verify --json`: the
llama.cpp `--kl-divergence` statistics for the candidate and the noise floor side by
side, the paired verdict, and the reasons. One schema for both."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel

from shadow.calibration import Calibration
from shadow.compare import SequenceComparison
from shadow.history import ComparedSequence
from shadow.reference_check import ReferenceCheck
from shadow.verdict import Interval, PairedSequences, Status, Verdict, VerdictPolicy, judge

# llama.cpp's percentile rows, highest first.
PERCENTILES = (100.0, 99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1, 0.0)
DIVERGED_BY = (8, 16, 32, 64, 128)


class Distribution(BaseModel):
    mean: float
    stderr: float  # of the mean, over tokens (as llama.cpp reports it)
    rms: float
    percentiles: dict[str, float]  # "99.9" -> value; "100" is the maximum, "0" the minimum


class Rate(BaseModel):
    value: float
    stderr: float


class SideReport(BaseModel):
    sequences: int
    tokens: int
    identical: int
    near_tie: int
    hard: int
    kl: Distribution  # per token KL(ref || side) over the side's top-k + rest, nats (a lower bound of the full KL)
    delta_p: Distribution  # per token p_side - p_ref of the emitted token
    drift: Distribution  # per token max |log-prob difference| over the side's top-k, nats
    same_top1: Rate
    diverged_by: dict[str, float]  # "16" -> share of sequences whose first divergence is at position <= 16
    first_divergence_median: float | None
    max_flip_margin: float | None  # widest reference margin at a first divergence, nats


class IntervalBody(BaseModel):
    estimate: float
    low: float | None  # None: unbounded (the data cannot bound it yet)
    high: float | None


class FloorBody(BaseModel):
    """Which noise floor the verdict judged against."""

    kind: str  # "transformers": the reference in the serving dtype as transformers runs it; "calibrated"
    kl_scale: float  # applied to the floor's KL (1 uncalibrated)
    top1_scale: float
    description: str
    calibration: Calibration | None = None


class VerdictBody(BaseModel):
    status: Status
    reasons: list[str]
    kl_ratio: IntervalBody | None = None  # anytime-valid: confidence sequences (shadow/verdict.py)
    excess_top1: IntervalBody | None = None
    excess_hard: IntervalBody | None = None
    checks: dict[str, Status] = {}
    # Each check's decision is taken on the contrast x - limit·d per sequence (shadow/verdict.py)
    contrasts: dict[str, IntervalBody] = {}
    # The converter's question: is the candidate detectably different from the noise floor
    # (a contrast at the floor itself is proven above 0)? None: too little data to say.
    different: bool | None = None
    decided_at: int | None = None  # sequences after which the current status was first taken
    floor: FloorBody | None = None
    policy: dict[str, float]


class TrajectoryPoint(BaseModel):
    sequences: int
    status: Status


class WindowBody(BaseModel):
    seconds: float | None  # None: everything the server keeps
    first: float | None  # unix time of the oldest sequence counted
    last: float | None
    evicted: int  # older sequences no longer kept (see --shadow-verdict-max-sequences)


class ShadowReport(BaseModel):
    model: str
    reference: str
    adapter: str = ""  # the mounted LoRA adapter judged ("" the base model): the reference has it applied, unmerged
    noise_dtype: str | None
    window: WindowBody
    candidate: SideReport | None
    noise_floor: SideReport | None
    verdict: VerdictBody
    trajectory: list[TrajectoryPoint] | None = None  # the verdict after each sequence, in arrival order
    # The reference's self-check (probe perplexities); None while not run, or when it is off.
    reference_check: ReferenceCheck | None = None


def build_report(
    records: list[ComparedSequence],
    *,
    model: str,
    reference: str,
    noise_dtype: str | None,
    policy: VerdictPolicy,
    window_s: float | None = None,
    evicted: int = 0,
    with_trajectory: bool = False,
    reference_check: ReferenceCheck | None = None,
    calibration: Calibration | None = None,
    unshadowed: str | None = None,
) -> ShadowReport:
    """`unshadowed`: why the reference cannot score this candidate (a mounted adapter it
    does not hold): nothing is judged."""
    judgement = verdict_of(records, noise_dtype=noise_dtype, policy=policy, reference_check=reference_check,
                           calibration=calibration, unshadowed=unshadowed)
    candidate = [r.candidate for r in records]
    noise = [r.noise for r in records if r.noise is not None]
    trajectory = None
    if judgement.floor is None:
        verdict = VerdictBody(status=judgement.verdict.status, reasons=judgement.verdict.reasons, policy=asdict(policy))
    else:
        verdict = _verdict_body(judgement.verdict, policy, judgement.floor)
        trajectory = trajectory_points(judgement.verdict.trajectory) if with_trajectory else None
    return ShadowReport(
        model=model,
        reference=reference,
        noise_dtype=noise_dtype,
        window=WindowBody(
            seconds=window_s,
            first=records[0].time if records else None,
            last=records[-1].time if records else None,
            evicted=evicted,
        ),
        candidate=side_report(candidate) if candidate else None,
        noise_floor=side_report(noise) if noise else None,
        verdict=verdict,
        trajectory=trajectory,
        reference_check=reference_check,
    )


@dataclass(frozen=True)
class Judgement:
    """The verdict over some records before it is written out (the report's body, or the
    gauges): `verdict` is judge's, or an inconclusive one saying why nothing was judged;
    `floor` the noise floor it was judged against (None: nothing was judged)."""

    verdict: Verdict
    floor: FloorBody | None

    @property
    def kl_scale(self) -> float:
        """The floor's KL scale (the shadow_verdict_floor_kl_scale gauge): 1 when uncalibrated or not judged."""
        return self.floor.kl_scale if self.floor is not None else 1.0


def verdict_of(
    records: list[ComparedSequence],
    *,
    noise_dtype: str | None,
    policy: VerdictPolicy,
    reference_check: ReferenceCheck | None = None,
    calibration: Calibration | None = None,
    unshadowed: str | None = None,
) -> Judgement:
    """The verdict alone, without the statistics' percentiles: what `build_report` says
    and what the shadow path publishes after every batch (shadow/recording.py)."""
    if unshadowed is not None:
        return Judgement(Verdict("inconclusive", [
            f"not shadowed: the reference cannot score this adapter, so its requests are not sampled: {unshadowed}"]),
            None)
    if reference_check is not None and not reference_check.trusted:
        return Judgement(Verdict("inconclusive", [
            "refused to judge: the reference failed its self-check, so a difference could be the reference's fault, "
            "not the candidate's", *reference_check.reasons, reference_check.summary()]), None)
    if noise_dtype is None or any(r.noise is None for r in records):
        return Judgement(Verdict("inconclusive", [
            "the noise floor is off (--shadow-noise-floor off): there is nothing to judge the drift against; the "
            "candidate's statistics are reported as they are"]), None)
    return Judgement(judge(paired(records, calibration), policy), floor_body(noise_dtype, calibration))


def paired(records: list[ComparedSequence], calibration: Calibration | None = None) -> PairedSequences:
    """The verdict's per-sequence table; the noise floor scaled to the engine when calibrated."""
    c = [r.candidate for r in records]
    n = [r.noise for r in records]
    table = PairedSequences(
        tokens=np.array([x.compared_tokens for x in c]),
        candidate_kl=np.array([x.tokens.kl.sum() for x in c]),
        noise_kl=np.array([x.tokens.kl.sum() for x in n]),
        candidate_top1_different=np.array([np.count_nonzero(~x.tokens.top1_same) for x in c]),
        noise_top1_different=np.array([np.count_nonzero(~x.tokens.top1_same) for x in n]),
        candidate_hard=np.array([x.result == "hard" for x in c]),
        noise_hard=np.array([x.result == "hard" for x in n]),
    )
    return table if calibration is None else table.scaled_noise(calibration.kl_ratio, calibration.top1_ratio)


def floor_body(noise_dtype: str | None, calibration: Calibration | None) -> FloorBody:
    if calibration is None:
        return FloorBody(kind="transformers", kl_scale=1.0, top1_scale=1.0,
                         description=f"the reference in {noise_dtype} run by transformers (not calibrated to the serving "
                                     "engine: shadowserve verify --calibrate measures it)")
    return FloorBody(kind="calibrated", kl_scale=calibration.kl_ratio, top1_scale=calibration.top1_ratio,
                     description=f"the reference in {noise_dtype} run by transformers, {calibration.describe()}",
                     calibration=calibration)


MAX_TRAJECTORY_POINTS = 256


def trajectory_points(statuses: list[Status]) -> list[TrajectoryPoint]:
    """The verdict as it read after each sequence arrived (verdict.judge replays every
    look): where it first left `inconclusive`, and whether it ever changed its mind. Past
    256 sequences every few sequences are shown (and the last), every change included."""
    n = len(statuses)
    step = -(-n // MAX_TRAJECTORY_POINTS) or 1
    shown = {*range(step, n, step), n} | {i + 1 for i in range(1, n) if statuses[i] != statuses[i - 1]}
    return [TrajectoryPoint(sequences=k, status=statuses[k - 1]) for k in sorted(shown) if k >= 1]


def side_report(comparisons: list[SequenceComparison]) -> SideReport:
    kl = np.concatenate([c.tokens.kl for c in comparisons])
    delta_p = np.concatenate([c.tokens.delta_p for c in comparisons])
    drift = np.concatenate([c.tokens.drift for c in comparisons])
    same = np.concatenate([c.tokens.top1_same for c in comparisons]).astype(np.float64)
    firsts = np.array([c.first_divergence for c in comparisons if c.first_divergence is not None])
    margins = [c.margin for c in comparisons if c.margin is not None]
    results = [c.result for c in comparisons]
    return SideReport(
        sequences=len(comparisons),
        tokens=int(kl.size),
        identical=results.count("identical"),
        near_tie=results.count("near_tie"),
        hard=results.count("hard"),
        kl=_distribution(kl),
        delta_p=_distribution(delta_p),
        drift=_distribution(drift),
        same_top1=Rate(value=float(same.mean()) if same.size else 1.0, stderr=_stderr(same)),
        diverged_by={str(n): float(np.count_nonzero(firsts <= n)) / len(comparisons) for n in DIVERGED_BY},
        first_divergence_median=float(np.median(firsts)) if firsts.size else None,
        max_flip_margin=max(margins) if margins else None,
    )


def _distribution(values: np.ndarray) -> Distribution:
    if values.size == 0:
        return Distribution(mean=0.0, stderr=0.0, rms=0.0, percentiles={})
    q = np.percentile(values, PERCENTILES)
    return Distribution(
        mean=float(values.mean()),
        stderr=_stderr(values),
        rms=float(np.sqrt(np.mean(np.square(values)))),
        percentiles={f"{p:g}": float(v) for p, v in zip(PERCENTILES, q)},
    )


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0


def _interval(value: Interval | None) -> IntervalBody | None:
    if value is None:
        return None
    bounded = lambda v: v if np.isfinite(v) else None  # noqa: E731 (JSON has no infinity)
    return IntervalBody(estimate=value.estimate, low=bounded(value.low), high=bounded(value.high))


def _verdict_body(verdict, policy: VerdictPolicy, floor: FloorBody) -> VerdictBody:
    reasons = verdict.reasons + ([] if verdict.status == "inconclusive" and verdict.kl_ratio is None else
                                 [f"noise floor: {floor.description}"])
    return VerdictBody(
        status=verdict.status,
        reasons=reasons,
        kl_ratio=_interval(verdict.kl_ratio),
        excess_top1=_interval(verdict.excess_top1),
        excess_hard=_interval(verdict.excess_hard),
        checks=verdict.checks,
        contrasts={name: _interval(value) for name, value in verdict.contrasts.items()},
        different=verdict.different,
        decided_at=verdict.decided_at,
        floor=floor,
        policy=asdict(policy),
    )
