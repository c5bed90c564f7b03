"""shadow/compare.py against hand-computed values and a property of the bucketed KL."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shadow.compare import ComparisonError, PositionStats, bucketed_kl, compare_sequence

LN = math.log


def ref_stats(dist: dict[int, float], cand_ids) -> PositionStats:
    """Reference stats from an explicit distribution {id: probability}."""
    top = sorted(dist, key=dist.get, reverse=True)
    return PositionStats({t: LN(dist[t]) for t in cand_ids}, top, [LN(dist[t]) for t in top])


def cand_entry(dist: dict[int, float], ids) -> dict[int, float]:
    return {t: LN(dist[t]) for t in ids}


def test_identical_distributions():
    dist = {1: 0.6, 2: 0.3, 3: 0.1}
    emitted = [1, 1, 2]
    out = compare_sequence(
        emitted, [cand_entry(dist, [1, 2])] * 3, [ref_stats(dist, [1, 2])] * 3, near_tie_margin=0.25
    )
    assert (out.result, out.first_divergence, out.compared_tokens) == ("identical", None, 3)
    assert out.tokens.kl.max() == pytest.approx(0.0, abs=1e-15)
    assert out.tokens.delta_p.max() == out.tokens.drift.max() == 0.0
    assert out.top1_agreement == 1.0


def test_hand_computed_kl_delta_p_and_drift():
    ref = {1: 0.5, 2: 0.3, 3: 0.2}
    cand = {1: 0.4, 2: 0.4, 3: 0.2}
    out = compare_sequence([2], [cand_entry(cand, [1, 2])], [ref_stats(ref, [1, 2])], near_tie_margin=0.25)
    # Buckets {1}, {2}, rest: both rests are 0.2 and cancel.
    expected_kl = 0.5 * LN(0.5 / 0.4) + 0.3 * LN(0.3 / 0.4)
    assert out.tokens.kl[0] == pytest.approx(expected_kl, rel=1e-12)
    assert out.tokens.delta_p[0] == pytest.approx(0.4 - 0.3)
    assert out.tokens.drift[0] == pytest.approx(max(abs(LN(0.4) - LN(0.5)), abs(LN(0.4) - LN(0.3))))
    assert out.tokens.emitted_drift[0] == pytest.approx(abs(LN(0.4) - LN(0.3)))


def test_rest_bucket_counts():
    # Candidate top-1 only; the rest buckets differ: 0.5 vs 0.1.
    assert bucketed_kl(np.log([0.5]), np.log([0.9])) == pytest.approx(0.5 * LN(0.5 / 0.9) + 0.5 * LN(0.5 / 0.1))


def test_divergence_at_position_3_and_its_kind():
    agree = {1: 0.7, 2: 0.2, 3: 0.1}
    ref_flip_close = {1: 0.44, 2: 0.46, 3: 0.10}  # ref prefers 2 by ln(0.46/0.44) = 0.044 nats
    ref_flip_far = {1: 0.05, 2: 0.85, 3: 0.10}  # ref prefers 2 by ln(0.85/0.05) = 2.83 nats
    emitted = [1, 1, 1, 1, 1]
    cand = [cand_entry(agree, [1, 2])] * 5
    for ref_at_3, kind, margin in [(ref_flip_close, "near_tie", LN(0.46 / 0.44)), (ref_flip_far, "hard", LN(0.85 / 0.05))]:
        refs = [ref_stats(agree, [1, 2])] * 3 + [ref_stats(ref_at_3, [1, 2])] + [ref_stats(ref_flip_far, [1, 2])]
        out = compare_sequence(emitted, cand, refs, near_tie_margin=0.25)
        assert out.first_divergence == 3
        assert out.result == kind
        assert out.margin == pytest.approx(margin)
        assert out.tokens.top1_same.tolist() == [True, True, True, False, False]
        assert out.top1_agreement == pytest.approx(0.6)


def test_top1_uses_the_candidates_argmax_not_the_sampled_token():
    dist = {1: 0.7, 2: 0.2, 3: 0.1}
    # A sampled request emitted token 3; both sides still agree on the argmax (1).
    out = compare_sequence([3], [cand_entry(dist, [1, 2, 3])], [ref_stats(dist, [1, 2, 3])], near_tie_margin=0.25)
    assert out.result == "identical"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_are_an_error(bad):
    dist = {1: 0.6, 2: 0.4}
    cand = cand_entry(dist, [1, 2])
    cand[2] = bad
    with pytest.raises(ComparisonError, match="non-finite"):
        compare_sequence([1], [cand], [ref_stats(dist, [1, 2])], near_tie_margin=0.25)


def test_misaligned_or_incomplete_inputs_are_an_error():
    dist = {1: 0.6, 2: 0.4}
    with pytest.raises(ComparisonError, match="misaligned"):
        compare_sequence([1, 1], [cand_entry(dist, [1])], [ref_stats(dist, [1])], near_tie_margin=0.25)
    with pytest.raises(ComparisonError, match="no reference log-prob"):
        compare_sequence([1], [cand_entry(dist, [1, 2])], [ref_stats(dist, [1])], near_tie_margin=0.25)


def full_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * (np.log(p) - np.log(q))))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**32 - 1),
    st.integers(min_value=2, max_value=200),
    st.floats(min_value=0.1, max_value=8.0),
    st.integers(min_value=1, max_value=20),
)
@example(seed=21, vocab=2, spread=7.75, k=1)  # a fresh clone's falsifying example (2026-12-06): q_rest ~2e-12
def test_bucketed_kl_never_exceeds_the_full_kl(seed, vocab, spread, k):
    rng = np.random.default_rng(seed)
    p = np.exp(rng.normal(0, spread, vocab))
    p /= p.sum()
    q = np.exp(rng.normal(0, spread, vocab))
    q /= q.sum()
    ids = np.argsort(-q)[: min(k, vocab)]  # the candidate's top-k
    bucketed = bucketed_kl(np.log(p[ids]), np.log(q[ids]))
    # Slack for float64 alone: the rest bucket's mass is 1 - sum(q over the top-k), whose
    # cancellation error (a few ulps of 1 per term) is relative to that mass, so its log is
    # off by up to ~4k ulps / q_rest (the rest floored at 1e-12, as bucketed_kl floors it),
    # weighted by p_rest: e.g. q_rest 2e-12, p_rest 1.3e-4 read 2e-9 nats over the full KL.
    p_rest, q_rest = max(1.0 - p[ids].sum(), 0.0), max(1.0 - q[ids].sum(), 1e-12)
    cancellation = p_rest * 4 * len(ids) * np.finfo(np.float64).eps / q_rest
    assert 0.0 <= bucketed <= full_kl(p, q) * (1 + 1e-7) + 1e-9 + cancellation


def test_extreme_candidate_logprobs_give_a_finite_kl():
    # A broken conversion can put the candidate's tail at -1000 nats: exp() underflows to 0.
    kl = bucketed_kl(np.log([0.5, 0.3]), np.array([-0.01, -1000.0]))
    expected = 0.5 * (LN(0.5) + 0.01) + 0.3 * (LN(0.3) + 1000) + 0.2 * (LN(0.2) - LN(1 - math.exp(-0.01)))
    assert np.isfinite(kl) and kl == pytest.approx(expected)
