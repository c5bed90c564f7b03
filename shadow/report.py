"""The report behind `GET /v1/shadow/verdict` and `shadowserve verify --json`: the
llama.cpp `--kl-divergence` statistics for the candidate and the noise floor side by
side, the paired verdict, and the reasons. One schema for both."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from pydantic import BaseModel

from shadow.compare import SequenceComparison
from shadow.history import ComparedSequence
from shadow.reference_check import ReferenceCheck
from shadow.verdict import Interval, PairedSequences, Status, VerdictPolicy, judge

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
    low: float
    high: float


class VerdictBody(BaseModel):
    status: Status
    reasons: list[str]
    kl_ratio: IntervalBody | None = None
    excess_top1: IntervalBody | None = None
    excess_hard: IntervalBody | None = None
    checks: dict[str, Status] = {}
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
) -> ShadowReport:
    candidate = [r.candidate for r in records]
    noise = [r.noise for r in records if r.noise is not None]
    trajectory = None
    if reference_check is not None and not reference_check.trusted:
        verdict = VerdictBody(
            status="inconclusive",
            reasons=["refused to judge: the reference failed its self-check, so a difference could be the "
                     "reference's fault, not the candidate's", *reference_check.reasons, reference_check.summary()],
            policy=asdict(policy),
        )
    elif noise_dtype is None or len(noise) != len(records):
        verdict = VerdictBody(
            status="inconclusive",
            reasons=["the noise floor is off (--shadow-noise-floor off): there is nothing to judge the drift against; "
                     "the candidate's statistics are reported as they are"],
            policy=asdict(policy),
        )
    else:
        verdict = _verdict_body(judge(paired(records), policy), policy)
        trajectory = verdict_trajectory(records, policy) if with_trajectory else None
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


def paired(records: list[ComparedSequence]) -> PairedSequences:
    c = [r.candidate for r in records]
    n = [r.noise for r in records]
    return PairedSequences(
        tokens=np.array([x.compared_tokens for x in c]),
        candidate_kl=np.array([x.tokens.kl.sum() for x in c]),
        noise_kl=np.array([x.tokens.kl.sum() for x in n]),
        candidate_top1_different=np.array([np.count_nonzero(~x.tokens.top1_same) for x in c]),
        noise_top1_different=np.array([np.count_nonzero(~x.tokens.top1_same) for x in n]),
        candidate_hard=np.array([x.result == "hard" for x in c]),
        noise_hard=np.array([x.result == "hard" for x in n]),
    )


MAX_TRAJECTORY_POINTS = 256


def verdict_trajectory(records: list[ComparedSequence], policy: VerdictPolicy) -> list[TrajectoryPoint]:
    """The verdict as it would have read after each sequence arrived: where it first left
    `inconclusive`, and whether it ever changed its mind. Past 256 sequences it is read
    every few sequences (and at the last), so the cost stays bounded."""
    step = -(-len(records) // MAX_TRAJECTORY_POINTS) or 1
    points = [*range(step, len(records), step), len(records)] if records else []
    table = paired(records)
    return [TrajectoryPoint(sequences=n, status=judge(table.head(n), policy).status) for n in points]


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
    return None if value is None else IntervalBody(**asdict(value))


def _verdict_body(verdict, policy: VerdictPolicy) -> VerdictBody:
    return VerdictBody(
        status=verdict.status,
        reasons=verdict.reasons,
        kl_ratio=_interval(verdict.kl_ratio),
        excess_top1=_interval(verdict.excess_top1),
        excess_hard=_interval(verdict.excess_hard),
        checks=verdict.checks,
        policy=asdict(policy),
    )
