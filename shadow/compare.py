"""Comparison maths (docs/design.md, "Comparison semantics"): pure, arrays in, numbers out.

Per completion position i, with the candidate's top-k set K_i (its log-probs include
the emitted token as well):

- top-1: the candidate's argmax over K_i vs the reference's argmax over the vocabulary.
  The candidate's *argmax*, not its sampled token, so sampled requests compare too.
- first divergence: the first i where they differ; `near_tie` when the candidate's
  top-1 is within `near_tie_margin` nats of the reference's top-1 *in the reference
  distribution*, else `hard`.
- KL(ref || cand) over the buckets K_i + {rest}: a lower bound of the full-vocabulary
  KL (grouping outcomes never increases a divergence).
- delta_p: p_cand(c_i) - p_ref(c_i) of the emitted token (llama.cpp's Δp).
- drift: max over K_i of |logprob_cand - logprob_ref|; also for the emitted token.

Inputs are float32 from the engines; everything is computed in float64. NaN or inf in
either side raises `ComparisonError`: an error outcome, never a metric value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

SequenceResult = Literal["identical", "near_tie", "hard"]


class ComparisonError(ValueError):
    """Inputs that cannot be compared (NaN/inf, misaligned lengths, missing ids)."""


@dataclass(frozen=True)
class PositionStats:
    """The reference's side of one completion position, as the scorer returns it."""

    logprobs: dict[int, float]  # reference log-prob of each id asked for (the candidate's entry, at least)
    top_ids: list[int]  # the reference's own top-m, best first
    top_logprobs: list[float]


@dataclass(frozen=True)
class TokenDrift:
    """Per-position arrays, one value per compared position."""

    kl: np.ndarray
    delta_p: np.ndarray
    drift: np.ndarray
    emitted_drift: np.ndarray
    top1_same: np.ndarray  # bool


@dataclass(frozen=True)
class SequenceComparison:
    compared_tokens: int
    first_divergence: int | None
    result: SequenceResult
    margin: float | None  # reference log-prob gap at the first divergence (nats)
    tokens: TokenDrift
    diverged: tuple[int, int] | None = None  # (candidate's top-1, reference's top-1) at the first divergence

    @property
    def top1_agreement(self) -> float:
        return float(self.tokens.top1_same.mean()) if self.compared_tokens else 1.0


def bucketed_kl(ref_logprobs: np.ndarray, cand_logprobs: np.ndarray) -> float:
    """KL(ref || cand) over the given ids plus one bucket for the remaining mass.

    Written with log-probs (p * (log p - log q)), so a candidate log-prob of -1000 gives
    a large finite term rather than log(0). The rest bucket's candidate mass is floored
    at 1e-12: float32 rounding can make the top-k sum reach 1 on the candidate's side."""
    ref_lp = np.asarray(ref_logprobs, dtype=np.float64)
    cand_lp = np.asarray(cand_logprobs, dtype=np.float64)
    p = np.exp(ref_lp)
    kl = float(np.sum(p * (ref_lp - cand_lp)))
    p_rest = 1.0 - p.sum()
    if p_rest > 1e-12:
        q_rest = max(1.0 - np.exp(cand_lp).sum(), 1e-12)
        kl += p_rest * (np.log(p_rest) - np.log(q_rest))
    if not np.isfinite(kl):
        raise ComparisonError("KL is not finite")
    # Rounding in float32 inputs can push a true zero a hair below it.
    return max(kl, 0.0)


def compare_sequence(
    emitted: list[int],
    candidate: list[dict[int, float]],
    reference: list[PositionStats],
    near_tie_margin: float,
) -> SequenceComparison:
    """Compare one generated sequence with the reference's teacher-forced statistics."""
    if not (len(emitted) == len(candidate) == len(reference)):
        raise ComparisonError(
            f"misaligned sequence: {len(emitted)} tokens, {len(candidate)} candidate and "
            f"{len(reference)} reference positions"
        )
    n = len(emitted)
    kl, delta_p, drift, emitted_drift = (np.zeros(n) for _ in range(4))
    top1_same = np.zeros(n, dtype=bool)
    first, margin, diverged = None, None, None
    for i, (token, cand, ref) in enumerate(zip(emitted, candidate, reference)):
        ids = list(cand)
        try:
            cand_lp = np.array([cand[t] for t in ids], dtype=np.float64)
            ref_lp = np.array([ref.logprobs[t] for t in ids], dtype=np.float64)
        except KeyError as exc:
            raise ComparisonError(f"position {i}: no reference log-prob for token {exc}") from exc
        ref_top = np.asarray(ref.top_logprobs, dtype=np.float64)
        if not (np.isfinite(cand_lp).all() and np.isfinite(ref_lp).all() and np.isfinite(ref_top).all()):
            raise ComparisonError(f"position {i}: non-finite log-probs")
        if token not in cand:
            raise ComparisonError(f"position {i}: emitted token {token} missing from the candidate's entry")
        cand_top1 = ids[int(np.argmax(cand_lp))]
        ref_top1 = ref.top_ids[0]
        top1_same[i] = cand_top1 == ref_top1
        kl[i] = bucketed_kl(ref_lp, cand_lp)
        delta_p[i] = np.exp(cand[token]) - np.exp(ref.logprobs[token])
        diffs = np.abs(cand_lp - ref_lp)
        drift[i] = diffs.max()
        emitted_drift[i] = diffs[ids.index(token)]
        if first is None and not top1_same[i]:
            first, diverged = i, (cand_top1, ref_top1)
            margin = float(ref_top[0] - ref.logprobs[cand_top1])
    if first is None:
        result: SequenceResult = "identical"
    else:
        assert margin is not None  # set with `first`
        result = "near_tie" if margin <= near_tie_margin else "hard"
    return SequenceComparison(n, first, result, margin, TokenDrift(kl, delta_p, drift, emitted_drift, top1_same), diverged)
