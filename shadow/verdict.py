"""The verdict (DESIGN.md, "Noise floor and verdict"): pure maths, paired per-sequence
statistics in, `pass` / `fail` / `inconclusive` out, always with its reasons.

Every compared sequence is seen twice over the same positions: the candidate against
the fp32 reference, and the noise floor (the reference in the serving dtype) against
the same fp32 reference. The verdict judges the candidate *relative to* that noise
floor, with three paired statistics and a bootstrap confidence interval over sequences
(resampling whole sequences keeps the dependence between a sequence's tokens):

- **KL ratio**: the candidate's mean token KL over the noise floor's (ratio of sums over
  the same tokens). The noise side is floored at `noise_kl_floor` nats per token, so an
  fp32 deployment, whose noise floor is exactly 0, has a finite scale.
- **excess top-1 disagreement**: (candidate disagreements - noise disagreements) per
  compared token.
- **excess hard rate**: (candidate `hard` sequences - noise `hard` sequences) per
  sequence. `hard` keeps its per-sequence meaning (a first divergence whose reference
  margin exceeds the near-tie margin); the verdict counts only what the noise floor,
  with the same margin, does not also produce — so a dtype whose own rounding sometimes
  flips a wide tie does not fail a healthy candidate.

Decision: `inconclusive` below `min_sequences` or `min_tokens`. `fail` as soon as the
lower confidence bound of any statistic is above its limit (the excess is real at the
chosen confidence). `pass` when the KL ratio's upper bound is within its limit and the
two excess rates' estimates are within theirs. Otherwise `inconclusive`: the interval
still straddles a limit. The bootstrap is seeded, so the same data always gives the same
verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Status = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True)
class VerdictPolicy:
    """Limits and confidence; the defaults are justified in README.md ("The verdict")."""

    kl_ratio_max: float = 2.0
    excess_top1_max: float = 0.01
    excess_hard_max: float = 0.1
    min_sequences: int = 8
    min_tokens: int = 32
    confidence: float = 0.95
    noise_kl_floor: float = 1e-6
    resamples: int = 1000
    seed: int = 0


@dataclass(frozen=True)
class PairedSequences:
    """One entry per compared sequence; both sides cover the same `tokens` positions."""

    tokens: np.ndarray
    candidate_kl: np.ndarray  # sum over the sequence's tokens of KL(ref || candidate)
    noise_kl: np.ndarray  # the same for the noise floor
    candidate_top1_different: np.ndarray  # positions whose top-1 differs from the reference's
    noise_top1_different: np.ndarray
    candidate_hard: np.ndarray  # 1 for a `hard` sequence, else 0
    noise_hard: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.tokens)
        for name in ("candidate_kl", "noise_kl", "candidate_top1_different", "noise_top1_different",
                     "candidate_hard", "noise_hard"):
            column = np.asarray(getattr(self, name), dtype=np.float64)
            if column.shape != (n,):
                raise ValueError(f"{name} has {column.shape} entries for {n} sequences")
            if not np.isfinite(column).all():
                raise ValueError(f"{name} is not finite")
            object.__setattr__(self, name, column)
        object.__setattr__(self, "tokens", np.asarray(self.tokens, dtype=np.float64))

    @property
    def sequences(self) -> int:
        return len(self.tokens)

    def head(self, n: int) -> PairedSequences:
        """The first n sequences (the verdict as it read after n arrived)."""
        return PairedSequences(**{name: getattr(self, name)[:n] for name in self.__dataclass_fields__})


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float


@dataclass(frozen=True)
class Verdict:
    status: Status
    reasons: list[str]
    kl_ratio: Interval | None = None
    excess_top1: Interval | None = None
    excess_hard: Interval | None = None
    checks: dict[str, Status] = field(default_factory=dict)  # per statistic


def judge(paired: PairedSequences, policy: VerdictPolicy = VerdictPolicy()) -> Verdict:
    n, tokens = paired.sequences, int(paired.tokens.sum())
    if n < policy.min_sequences or tokens < policy.min_tokens:
        return Verdict("inconclusive", [
            f"{n} sequences / {tokens} tokens compared; a verdict needs at least {policy.min_sequences} "
            f"sequences and {policy.min_tokens} tokens"
        ])
    weights = _resample_weights(n, policy)
    kl, top1, hard = (_interval(stat, paired, weights, policy) for stat in (_kl_ratio, _excess_top1, _excess_hard))
    checks: dict[str, Status] = {
        "kl_ratio": _decide(kl, policy.kl_ratio_max, by_upper_bound=True),
        "excess_top1": _decide(top1, policy.excess_top1_max, by_upper_bound=False),
        "excess_hard": _decide(hard, policy.excess_hard_max, by_upper_bound=False),
    }
    level = f"{policy.confidence:.0%} CI"
    floor_note = ""
    if paired.noise_kl.sum() < policy.noise_kl_floor * paired.tokens.sum():
        floor_note = f" (the noise floor is below {policy.noise_kl_floor:g} nats/token: the ratio is taken against that floor)"
    text = {
        "kl_ratio": f"mean token KL is {kl.estimate:.3g}x the noise floor's ({level} {kl.low:.3g}-{kl.high:.3g}x), "
                    f"limit {policy.kl_ratio_max:g}x{floor_note}",
        "excess_top1": f"top-1 disagreement is {_points(top1.estimate)} points above the noise floor's ({level} "
                       f"{_points(top1.low)} to {_points(top1.high)}), limit {_points(policy.excess_top1_max)}",
        "excess_hard": f"hard divergences in {paired.candidate_hard.mean():.0%} of sequences vs "
                       f"{paired.noise_hard.mean():.0%} for the noise floor: {_points(hard.estimate)} points in excess "
                       f"({level} {_points(hard.low)} to {_points(hard.high)}), limit {_points(policy.excess_hard_max)}",
    }
    order = {"fail": 0, "inconclusive": 1, "pass": 2}
    reasons = [f"{_words(checks[name])}: {text[name]}" for name in sorted(checks, key=lambda name: order[checks[name]])]
    values = set(checks.values())
    status: Status = "fail" if "fail" in values else "pass" if values == {"pass"} else "inconclusive"
    return Verdict(status, reasons, kl, top1, hard, checks)


def _decide(interval: Interval, limit: float, *, by_upper_bound: bool) -> Status:
    if interval.low > limit:
        return "fail"
    within = interval.high if by_upper_bound else interval.estimate
    return "pass" if within <= limit else "inconclusive"


def _words(status: Status) -> str:
    return {"pass": "within the limit", "fail": "above the limit", "inconclusive": "undecided"}[status]


def _points(rate: float) -> str:
    return f"{100 * rate:.2g}"


def _resample_weights(n: int, policy: VerdictPolicy) -> np.ndarray:
    """Row 0 is the data itself; the others are bootstrap resamples of whole sequences."""
    rng = np.random.default_rng(policy.seed)
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=policy.resamples).astype(np.float64)
    return np.vstack([np.ones(n), draws])


def _kl_ratio(p: PairedSequences, w: np.ndarray, policy: VerdictPolicy) -> np.ndarray:
    noise = np.maximum(w @ p.noise_kl, policy.noise_kl_floor * (w @ p.tokens))
    return (w @ p.candidate_kl) / noise


def _excess_top1(p: PairedSequences, w: np.ndarray, policy: VerdictPolicy) -> np.ndarray:
    return (w @ (p.candidate_top1_different - p.noise_top1_different)) / (w @ p.tokens)


def _excess_hard(p: PairedSequences, w: np.ndarray, policy: VerdictPolicy) -> np.ndarray:
    return (w @ (p.candidate_hard - p.noise_hard)) / w.sum(axis=1)


def _interval(statistic, paired: PairedSequences, weights: np.ndarray, policy: VerdictPolicy) -> Interval:
    values = statistic(paired, weights, policy)
    tail = (1 - policy.confidence) / 2
    low, high = np.quantile(values[1:], [tail, 1 - tail])
    return Interval(float(values[0]), float(low), float(high))
