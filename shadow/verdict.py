"""The verdict (docs/design.md, "Noise floor and verdict", "Verdict v2"): pure maths, paired
per-sequence statistics in, `pass` / `fail` / `inconclusive` out, always with its
reasons, and a second answer beside it: is the candidate *detectably different* from the
noise floor at all?

Every compared sequence is seen twice over the same positions: the candidate against
the fp32 reference, and the noise floor (the reference in the serving dtype, optionally
calibrated to the serving engine) against the same fp32 reference. Three paired
statistics, each a ratio of per-sequence sums E[x] / E[d]:

- **KL ratio**: candidate KL over noise KL (x = candidate KL, d = noise KL, floored at
  `noise_kl_floor` nats per token so an fp32 deployment, whose noise is exactly 0, has a
  finite scale).
- **excess top-1 disagreement**: (candidate - noise) disagreements per compared token.
- **excess hard rate**: (candidate - noise) `hard` sequences per sequence.

**Anytime-valid.** The verdict is read continuously (the endpoint, a gauge scraped every
15 s, an Argo analysis every interval), so its intervals are *confidence sequences*:
they hold at every number of sequences at once, not at one fixed sample size. The
confidence sequence for the mean of a paired column is the asymptotic confidence
sequence of Waudby-Smith, Arnold, Wu, Wang & Ramdas, "Time-uniform central limit theory
and asymptotic confidence sequences" (Annals of Statistics, 2024, Theorem 2.2): the
running mean ± σ̂_t · sqrt(2 (t ρ² + 1) / (t² ρ²) · log(sqrt(t ρ² + 1) / α)), Robbins'
normal-mixture boundary (Howard, Ramdas, McAuliffe & Sekhon 2021, eq. (14)) with the
sample variance plugged in. ρ is tuned to be tightest at `tuned_sequences` (their eq.
(2.7)). The three statistics share α (Bonferroni): they hold together, at every look,
with probability at least `confidence`. Decisions are made only from `min_sequences` and
`min_tokens` on (the burn-in the central limit approximation needs); the error rates
this gives on heavy-tailed KL are measured in bench/verdict_error_rates.py.

**Decisions on the contrast.** E[d] > 0 is known in advance (KL >= 0 and floored; token
and sequence counts), so "E[x] / E[d] above the limit r" is exactly "E[x - r·d] > 0". A
check is `fail` once the confidence sequence of the contrast x - r·d at its limit lies
above 0 and `pass` once it lies at or below 0. The contrast's interval stays bounded when
the denominator is heavy-tailed (a gross bug's garbage continuations give the noise floor
one huge per-sequence KL), where the ratio's own interval (below) is unbounded and a rule
read off it stalls at `inconclusive`; where the ratio's interval is bounded the two rules
take the same decisions. The ratio's interval, for display only, is Fieller's inversion
(Fieller 1954): the set of r whose contrast's confidence sequence contains 0; the KL
ratio's is shown on [0, inf), "unbounded above" when it is.

**Decisions stand until the opposite is proven.** In between the two proofs a check keeps
its last decision. The KL ratio is the
tolerance a `pass` must prove; the two excess rates are guards that can only fail
(proving an excess hard rate below 0.1 takes hundreds of sequences, and a candidate that
has it but a KL within tolerance is not what the guards exist for). So a candidate within
tolerance is ever declared `fail` with probability at most 1 - confidence, and one
beyond the KL tolerance ever declared `pass` likewise, however often the verdict is
read. The trajectory (the status after each sequence, in arrival order) comes from the
same pass over the data, so "decided after n sequences" and "never reversed" are read
from it.

**Detectably different** (the converter's question: a conversion is exact up to
rounding) once any contrast at the noise floor itself is proven above 0: the candidate's
KL above the noise floor's (x - d), or an excess rate above 0. It is a claim at the same
confidence and, once made, it stands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, cast

import numpy as np

Status = Literal["pass", "fail", "inconclusive"]
CHECKS = ("kl_ratio", "excess_top1", "excess_hard")
GUARDS = ("excess_top1", "excess_hard")  # can fail a candidate, never pass one
FLOOR = {"kl_ratio": 1.0, "excess_top1": 0.0, "excess_hard": 0.0}  # the noise floor itself, per statistic


@dataclass(frozen=True)
class VerdictPolicy:
    """Limits and confidence; the defaults are justified in docs/verdict.md ("The tolerance")."""

    kl_ratio_max: float = 2.0
    excess_top1_max: float = 0.01
    excess_hard_max: float = 0.1
    min_sequences: int = 8
    min_tokens: int = 32
    confidence: float = 0.95
    noise_kl_floor: float = 1e-6
    tuned_sequences: int = 32  # the confidence sequences are tightest here


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

    def scaled_noise(self, kl: float, top1: float) -> PairedSequences:
        """The noise floor scaled to the serving engine's (a calibration's ratios)."""
        return PairedSequences(**{**{name: getattr(self, name) for name in self.__dataclass_fields__},
                                  "noise_kl": self.noise_kl * kl, "noise_top1_different": self.noise_top1_different * top1})


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
    different: bool | None = None  # detectably different from the noise floor; None: too little data
    decided_at: int | None = None  # sequences after which the current status was first taken
    trajectory: list[Status] = field(default_factory=list)  # the status after each sequence
    # per statistic, the contrast x - limit·d per sequence that the decision is taken on
    contrasts: dict[str, Interval] = field(default_factory=dict)


def judge(paired: PairedSequences, policy: VerdictPolicy = VerdictPolicy()) -> Verdict:
    n, tokens = paired.sequences, int(paired.tokens.sum())
    if n == 0:
        return Verdict("inconclusive", [_too_few(0, 0, policy)])
    columns = _columns(paired, policy)
    limits = _limits(policy)
    ready = (np.arange(1, n + 1) >= policy.min_sequences) & (np.cumsum(paired.tokens) >= policy.min_tokens)
    at_limit = {name: contrast_sequence(*columns[name], limits[name], policy) for name in CHECKS}
    checks_t = {name: _sticky(*at_limit[name], ready, guard=name in GUARDS) for name in CHECKS}
    status_t = _combine(checks_t)
    at_floor = {name: contrast_sequence(*columns[name], FLOOR[name], policy) for name in CHECKS}
    different_t = np.logical_or.accumulate(np.any([ready & (at_floor[name][0] > 0) for name in CHECKS], axis=0))
    trajectory = [cast(Status, str(s)) for s in status_t]
    if not ready[-1]:
        return Verdict("inconclusive", [_too_few(n, tokens, policy)], trajectory=trajectory)

    bounds = {name: ratio_sequence(*columns[name], policy, nonnegative=name == "kl_ratio") for name in CHECKS}
    intervals = {name: Interval(*(float(v[-1]) for v in bounds[name])) for name in CHECKS}
    contrasts = {name: Interval(float(np.mean(columns[name][0] - limits[name] * columns[name][1])),
                                float(at_limit[name][0][-1]), float(at_limit[name][1][-1])) for name in CHECKS}
    checks: dict[str, Status] = {name: cast(Status, str(checks_t[name][-1])) for name in CHECKS}
    status: Status = trajectory[-1]
    changes = np.flatnonzero(status_t != status_t[-1])
    decided_at = None if status == "inconclusive" else int(changes[-1] + 2 if changes.size else 1)
    kl, top1, hard = (intervals[name] for name in CHECKS)
    level = f"{policy.confidence:.0%} CS"
    floor_note = ""
    if paired.noise_kl.sum() < policy.noise_kl_floor * paired.tokens.sum():
        floor_note = f" (the noise floor is below {policy.noise_kl_floor:g} nats/token: the ratio is taken against that floor)"
    text = {
        "kl_ratio": f"mean token KL is {kl.estimate:.3g}x the noise floor's ({level} {_x(kl.low)} to {_x(kl.high)}), "
                    f"limit {policy.kl_ratio_max:g}x{floor_note}{_contrast_note(contrasts['kl_ratio'], kl, policy, level)}",
        "excess_top1": f"top-1 disagreement is {_points(top1.estimate)} points above the noise floor's ({level} "
                       f"{_points(top1.low)} to {_points(top1.high)}), limit {_points(policy.excess_top1_max)}",
        "excess_hard": f"hard divergences in {paired.candidate_hard.mean():.0%} of sequences vs "
                       f"{paired.noise_hard.mean():.0%} for the noise floor: {_points(hard.estimate)} points in excess "
                       f"({level} {_points(hard.low)} to {_points(hard.high)}), limit {_points(policy.excess_hard_max)}",
    }
    order = {"fail": 0, "inconclusive": 1, "pass": 2}
    reasons = [f"{_words(checks[name], name)}: {text[name]}" for name in sorted(CHECKS, key=lambda name: order[checks[name]])]
    different = bool(different_t[-1])
    reasons.append(_difference(different, {name: at_floor[name][0][-1] > 0 for name in CHECKS}, kl, top1, hard, level))
    return Verdict(status, reasons, kl, top1, hard, checks, different, decided_at, trajectory, contrasts)


def boundary(t: np.ndarray, alpha: float, tuned: int) -> np.ndarray:
    """The asymptotic confidence sequence's half-width in units of σ̂ after t observations
    (Waudby-Smith et al. 2024, Theorem 2.2; ρ from their eq. (2.7), tightest at t = tuned):
    |mean_t - μ| <= σ̂_t · boundary(t) for every t at once, with probability >= 1 - alpha."""
    rho2 = (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / tuned
    t = np.asarray(t, dtype=np.float64)
    return np.sqrt(2 * (t * rho2 + 1) / (t * t * rho2) * np.log(np.sqrt(t * rho2 + 1) / alpha))


def _columns(p: PairedSequences, policy: VerdictPolicy) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each statistic as E[x] / E[d] over sequences."""
    return {
        "kl_ratio": (p.candidate_kl, np.maximum(p.noise_kl, policy.noise_kl_floor * p.tokens)),
        "excess_top1": (p.candidate_top1_different - p.noise_top1_different, p.tokens),
        "excess_hard": (p.candidate_hard - p.noise_hard, np.ones_like(p.tokens)),
    }


def contrast_sequence(x: np.ndarray, d: np.ndarray, r: float, policy: VerdictPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Low and high of the confidence sequence for the mean of x - r·d after each observation.
    With E[d] > 0 known, E[x] / E[d] > r is exactly E[x - r·d] > 0: the decision at a limit r
    is taken here, where a heavy-tailed d cannot make the interval unbounded."""
    t, m_x, m_d, v_x, v_d, c, w = _moments(x, d, policy)
    with np.errstate(invalid="ignore"):
        half = np.sqrt(w * np.maximum(v_x - 2 * r * c + r * r * v_d, 0))
    mean = m_x - r * m_d
    low, high = mean - half, mean + half
    low[t < 2], high[t < 2] = -np.inf, np.inf
    return low, high


def ratio_sequence(x: np.ndarray, d: np.ndarray, policy: VerdictPolicy, *,
                   nonnegative: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Estimate, low and high of E[x] / E[d] after each observation, for display: the r
    whose x - r·d has a confidence sequence containing 0, solved in closed form (Fieller):
    (m_x - r m_d)^2 <= w (v_x - 2 r c + r^2 v_d), w = boundary^2. When the denominator's own
    interval reaches 0 the set is unbounded (the whole line, or two rays); `nonnegative`
    (a ratio that cannot be negative, like the KL ratio) shows its hull on [0, inf)."""
    t, m_x, m_d, v_x, v_d, c, w = _moments(x, d, policy)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = m_d * m_d - w * v_d
        b = m_x * m_d - w * c
        q = b * b - a * (m_x * m_x - w * v_x)
        disc = np.sqrt(np.maximum(q, 0))
        estimate = np.where(m_d != 0, m_x / m_d, np.nan)
        bounded = a > 0  # else the denominator's own interval reaches 0: the ratio is unbounded
        root_low = np.where(bounded, (b - disc) / np.where(bounded, a, 1), -np.inf)
        root_high = np.where(bounded, (b + disc) / np.where(bounded, a, 1), np.inf)
        if nonnegative:
            # unbounded: (-inf, r1] ∪ [r2, inf) with r1 < r2 the roots (a < 0), or the whole line
            r1, r2 = (b + disc) / np.where(bounded, -1, a), (b - disc) / np.where(bounded, -1, a)
            rays = ~bounded & (q > 0) & (a != 0)
            root_low = np.where(bounded, np.maximum(root_low, 0),
                                np.where(rays & (r1 < 0), np.maximum(r2, 0), 0.0))
            root_high = np.where(bounded, np.maximum(root_high, 0), np.inf)
    low, high = root_low, root_high
    low[t < 2], high[t < 2] = (0.0 if nonnegative else -np.inf), np.inf
    return estimate, low, high


def _moments(x: np.ndarray, d: np.ndarray, policy: VerdictPolicy):
    """Running means, variances and covariance of the paired columns, and the squared
    boundary w, after each observation."""
    t = np.arange(1, len(x) + 1, dtype=np.float64)
    m_x, m_d = np.cumsum(x) / t, np.cumsum(d) / t
    dof = np.maximum(t - 1, 1)
    v_x = np.maximum(np.cumsum(x * x) - t * m_x * m_x, 0) / dof
    v_d = np.maximum(np.cumsum(d * d) - t * m_d * m_d, 0) / dof
    c = (np.cumsum(x * d) - t * m_x * m_d) / dof
    w = boundary(t, (1 - policy.confidence) / len(CHECKS), policy.tuned_sequences) ** 2
    return t, m_x, m_d, v_x, v_d, c, w


def _limits(policy: VerdictPolicy) -> dict[str, float]:
    return {"kl_ratio": policy.kl_ratio_max, "excess_top1": policy.excess_top1_max, "excess_hard": policy.excess_hard_max}


def _sticky(low: np.ndarray, high: np.ndarray, ready: np.ndarray, *, guard: bool) -> np.ndarray:
    """Each check after each sequence, from its contrast at the limit: proven above 0
    (fail), proven at or below 0 (pass; not for a guard), or its last decision."""
    out = np.empty(len(low), dtype=object)
    state: Status = "inconclusive"
    for i in range(len(low)):
        if ready[i]:
            if low[i] > 0:
                state = "fail"
            elif guard:
                state = "pass" if state == "inconclusive" else state
            elif high[i] <= 0:
                state = "pass"
        out[i] = state if ready[i] else "inconclusive"
    return out


def _combine(checks_t: dict[str, np.ndarray]) -> np.ndarray:
    stacked = np.array([checks_t[name] for name in CHECKS], dtype=object)
    failed = (stacked == "fail").any(axis=0)
    passed = (stacked == "pass").all(axis=0)
    return np.where(failed, "fail", np.where(passed, "pass", "inconclusive")).astype(object)


def _too_few(n: int, tokens: int, policy: VerdictPolicy) -> str:
    return (f"{n} sequences / {tokens} tokens compared; a verdict needs at least {policy.min_sequences} "
            f"sequences and {policy.min_tokens} tokens")


def _difference(different: bool, now: dict[str, bool], kl: Interval, top1: Interval, hard: Interval, level: str) -> str:
    if different:
        proofs = [(f"KL ratio at least {kl.low:.3g}x" if kl.low > 1 else "mean KL above the noise floor's, proven on "
                   "their difference") if now["kl_ratio"] else "",
                  _excess_proof("excess top-1", top1) if now["excess_top1"] else "",
                  _excess_proof("excess hard rate", hard) if now["excess_hard"] else ""]
        shown = "; ".join(p for p in proofs if p) or "an interval excluded it at an earlier look"
        return f"detectably different from the noise floor ({level}): {shown}"
    return (f"not detectably different from the noise floor: its {level} still includes it "
            f"(KL ratio {_x(kl.low)} to {_x(kl.high)})")


def _excess_proof(name: str, interval: Interval) -> str:
    if interval.low > 0:
        return f"{name} at least {_points(interval.low)} points"
    return f"{name} above 0, proven on the contrast (its ratio's interval is unbounded)"


def _contrast_note(contrast: Interval, kl: Interval, policy: VerdictPolicy, level: str) -> str:
    """The ratio's interval is unbounded above when the noise floor's own KL is heavy-tailed;
    the decision is taken on the contrast, which is said then."""
    if not math.isinf(kl.high):
        return ""
    return (f"; the ratio's interval is unbounded above, the decision is taken on KL - {policy.kl_ratio_max:g}x noise: "
            f"{contrast.estimate:.3g} nats per sequence ({level} {contrast.low:.3g} to {contrast.high:.3g})")


def _words(status: Status, name: str) -> str:
    if name in GUARDS and status == "pass":
        return "not above the limit"
    return {"pass": "within the limit", "fail": "above the limit", "inconclusive": "undecided"}[status]


def _x(value: float) -> str:
    return "unbounded above" if math.isinf(value) and value > 0 else "-inf" if math.isinf(value) else f"{value:.3g}x"


def _points(rate: float) -> str:
    return ("unbounded" if rate > 0 else "-unbounded") if math.isinf(rate) else f"{100 * rate:.2g}"
