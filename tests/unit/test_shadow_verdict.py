"""The verdict maths on synthetic paired statistics (shadow/verdict.py), and the report
built from compared sequences (shadow/report.py) against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest

from shadow.history import ComparedSequence
from shadow.report import build_report, paired, trajectory_points
from shadow.verdict import CHECKS, PairedSequences, VerdictPolicy, boundary, contrast_sequence, judge, ratio_sequence
from tests.verdict_streams import TOKENS, records


def noise_like(n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """Per-sequence KL sums as precision noise gives them: heavy-tailed across sequences
    (a few near-ties carry most of the mass), ~8e-4 nats per token on average."""
    rng = np.random.default_rng(seed)
    return scale * TOKENS * 8e-4 * rng.lognormal(0.0, 1.0, n) / np.exp(0.5)


def pairs(n: int = 32, *, candidate_kl=None, noise_kl=None, cand_diff=1, noise_diff=1, cand_hard=0, noise_hard=0):
    noise_kl = noise_like(n, 1) if noise_kl is None else noise_kl
    return PairedSequences(
        tokens=np.full(n, TOKENS),
        candidate_kl=noise_like(n, 2) if candidate_kl is None else candidate_kl,
        noise_kl=noise_kl,
        candidate_top1_different=np.broadcast_to(cand_diff, n),
        noise_top1_different=np.broadcast_to(noise_diff, n),
        candidate_hard=np.broadcast_to(cand_hard, n),
        noise_hard=np.broadcast_to(noise_hard, n),
    )


def test_a_candidate_identical_to_the_noise_floor_passes():
    noise = noise_like(32, 1)
    verdict = judge(pairs(candidate_kl=noise, noise_kl=noise))
    assert verdict.status == "pass"
    assert verdict.kl_ratio.estimate == pytest.approx(1.0)
    assert verdict.kl_ratio.low == pytest.approx(1.0) and verdict.kl_ratio.high == pytest.approx(1.0)


def test_a_candidate_drawn_from_the_same_noise_passes():
    verdict = judge(pairs())
    assert verdict.status == "pass", verdict.reasons
    # Independent draws (no shared near-ties) are noisier than real pairs: the interval
    # is wide, but the pass it proved early on stands.
    assert verdict.kl_ratio.low < 1.0 < verdict.kl_ratio.high
    assert verdict.different is False


def test_a_candidate_at_five_times_the_noise_kl_fails():
    verdict = judge(pairs(candidate_kl=noise_like(32, 2, scale=5.0)))
    assert verdict.status == "fail"
    assert verdict.checks["kl_ratio"] == "fail"
    # proven above 2x at some look (a decision stands), detectably different now
    assert verdict.decided_at is not None and verdict.kl_ratio.low > 1.0 and verdict.different
    assert verdict.reasons[0].startswith("above the limit: mean token KL is")


def test_too_few_tokens_are_inconclusive():
    verdict = judge(pairs(n=4, candidate_kl=noise_like(4, 2, scale=50.0)))
    assert verdict.status == "inconclusive"
    assert "a verdict needs at least 8 sequences and 32 tokens" in verdict.reasons[0]
    assert judge(pairs(n=8), VerdictPolicy(min_tokens=10_000)).status == "inconclusive"


def test_an_interval_that_straddles_the_limit_is_inconclusive():
    # Two sequences dominate: the ratio could be anywhere between ~1 and ~3.
    noise = np.full(10, 0.05)
    candidate = np.full(10, 0.05)
    candidate[:2] = 0.4
    verdict = judge(pairs(n=10, candidate_kl=candidate, noise_kl=noise))
    assert verdict.status == "inconclusive", verdict.reasons
    assert verdict.kl_ratio.low < 2.0 < verdict.kl_ratio.high
    assert verdict.reasons[0].startswith("undecided: mean token KL")


def test_excess_top1_disagreement_fails_with_noise_level_kl():
    # Same KL scale, but 3 of 64 tokens per sequence flip where the noise flips 1.
    verdict = judge(pairs(cand_diff=3, noise_diff=1))
    assert verdict.checks["kl_ratio"] == "pass"
    assert verdict.checks["excess_top1"] == "fail" and verdict.status == "fail"
    assert verdict.excess_top1.estimate == pytest.approx(2 / 64)


def test_hard_divergences_count_only_in_excess_of_the_noise_floor():
    rng = np.random.default_rng(3)
    noisy_hard = (rng.random(32) < 0.3).astype(float)
    # The dtype itself flips wide ties in ~30% of sequences, the candidate the same ones: pass.
    assert judge(pairs(cand_hard=noisy_hard, noise_hard=noisy_hard)).status == "pass"
    # The candidate diverges hard in every sequence: fail, whatever the KL says.
    verdict = judge(pairs(cand_hard=1, noise_hard=noisy_hard))
    assert verdict.checks["excess_hard"] == "fail" and verdict.status == "fail"
    assert verdict.excess_hard.estimate == pytest.approx(1 - noisy_hard.mean())


def test_an_fp32_noise_floor_of_zero_is_judged_against_the_floor():
    zero = np.zeros(32)
    exact = judge(pairs(candidate_kl=np.full(32, TOKENS * 2e-9), noise_kl=zero, cand_diff=0, noise_diff=0))
    assert exact.status == "pass" and exact.kl_ratio.estimate == pytest.approx(2e-3)
    assert "ratio is taken against that floor" in " ".join(exact.reasons)
    broken = judge(pairs(candidate_kl=np.full(32, TOKENS * 1e-3), noise_kl=zero, cand_diff=0, noise_diff=0))
    assert broken.status == "fail" and broken.kl_ratio.estimate == pytest.approx(1000)


def test_the_bounds_are_where_the_confidence_sequence_of_x_minus_r_d_reaches_zero():
    """Fieller's inversion, checked directly: at each reported bound r, the mean of
    x - r d is exactly the asymptotic confidence sequence's half-width from 0."""
    p = pairs(n=40, candidate_kl=noise_like(40, 2, scale=1.4))
    policy = VerdictPolicy()
    verdict = judge(p, policy)
    x, d = p.candidate_kl, np.maximum(p.noise_kl, policy.noise_kl_floor * p.tokens)
    alpha = (1 - policy.confidence) / len(CHECKS)
    rho2 = (-2 * np.log(alpha) + np.log(-2 * np.log(alpha) + 1)) / policy.tuned_sequences
    t = len(x)
    half = np.sqrt(2 * (t * rho2 + 1) / (t * t * rho2) * np.log(np.sqrt(t * rho2 + 1) / alpha))
    assert boundary(np.array([t]), alpha, policy.tuned_sequences)[0] == pytest.approx(half)
    for r in (verdict.kl_ratio.low, verdict.kl_ratio.high):
        z = x - r * d
        assert abs(z.mean()) == pytest.approx(half * z.std(ddof=1), rel=1e-9)
    assert verdict.kl_ratio.low < 1.4 < verdict.kl_ratio.high


def test_a_gross_bug_with_a_heavy_tailed_noise_floor_fails_on_the_contrast():
    """The issue's deterministic 886x-class case: the first sequence's noise floor has a KL
    of 5 nats, every later one 1e-3, and the candidate reads 1 nat on every sequence. The
    ratio's interval stays unbounded above (the noise floor's own interval reaches 0), so a
    rule read off it is `inconclusive` after 200 sequences; the contrast KL - 2x noise is
    bounded and proves the fail at the 45th sequence."""
    n = 200
    noise = np.full(n, 1e-3)
    noise[0] = 5.0
    p = pairs(n=n, candidate_kl=np.ones(n), noise_kl=noise, cand_diff=0, noise_diff=0)
    verdict = judge(p)
    assert verdict.status == "fail" and verdict.checks["kl_ratio"] == "fail" and verdict.decided_at == 45
    assert verdict.kl_ratio.high == np.inf and verdict.kl_ratio.low >= 0
    contrast = verdict.contrasts["kl_ratio"]
    assert contrast.low > 0 and contrast.estimate == pytest.approx(np.mean(1 - 2 * noise))
    assert "unbounded above" in verdict.reasons[0] and "decision is taken on KL - 2x noise" in verdict.reasons[0]
    # the old rule (Fieller's bounds against the limit) never decides on these data
    _, low, high = ratio_sequence(p.candidate_kl, p.noise_kl, VerdictPolicy())
    assert not np.any(low[7:] > 2.0) and not np.any(high[7:] <= 2.0)


def test_the_contrast_is_the_confidence_sequence_of_x_minus_r_d():
    """Checked against a direct computation of the asymptotic confidence sequence of z = x - r d."""
    p = pairs(n=40, candidate_kl=noise_like(40, 2, scale=1.4))
    policy = VerdictPolicy()
    x, d = p.candidate_kl, np.maximum(p.noise_kl, policy.noise_kl_floor * p.tokens)
    low, high = contrast_sequence(x, d, 2.0, policy)
    for t in (2, 9, 40):
        z = x[:t] - 2.0 * d[:t]
        half = boundary(np.array([t]), (1 - policy.confidence) / len(CHECKS), policy.tuned_sequences)[0] * z.std(ddof=1)
        assert low[t - 1] == pytest.approx(z.mean() - half, rel=1e-9) and high[t - 1] == pytest.approx(z.mean() + half, rel=1e-9)
    assert low[0] == -np.inf and high[0] == np.inf


@pytest.mark.parametrize("seed", range(6))
def test_where_the_ratio_interval_is_bounded_the_contrast_decides_as_it_would(seed):
    """Fieller's interval is the set of r whose contrast contains 0: where it is bounded,
    'low above the limit' is 'the contrast at the limit above 0' (and likewise for high)."""
    rng = np.random.default_rng(seed)
    n = 120
    d = TOKENS * 8e-4 * rng.lognormal(0, 1.0, n)
    x = d * rng.uniform(0.5, 4.0) * rng.lognormal(0, 1.0, n)
    policy = VerdictPolicy()
    _, low, high = ratio_sequence(x, d, policy)
    c_low, c_high = contrast_sequence(x, d, 2.0, policy)
    bounded = np.isfinite(low) & np.isfinite(high)
    assert bounded[20:].any()
    assert np.array_equal((low > 2.0)[bounded], (c_low > 0)[bounded])
    assert np.array_equal((high < 2.0)[bounded], (c_high < 0)[bounded])


def test_the_kl_ratio_interval_is_never_below_zero():
    """A ratio of two KLs cannot be negative: a soft-cap bug on a tiny Gemma-2 read
    "73x [-17, 103]". Fieller's set is shown on [0, inf)."""
    rng = np.random.default_rng(3)
    n = 12
    noise = TOKENS * 1e-3 * rng.lognormal(0, 2.5, n)
    cand = 20 * TOKENS * 1e-3 * rng.lognormal(0, 2.5, n)
    raw = ratio_sequence(cand, noise, VerdictPolicy())
    shown = ratio_sequence(cand, noise, VerdictPolicy(), nonnegative=True)
    assert (raw[1] < 0).any()  # the construction reaches below 0 here
    assert (shown[1] >= 0).all() and (shown[2] >= 0).all()
    finite = np.isfinite(raw[1]) & np.isfinite(raw[2]) & (raw[1] >= 0)
    assert np.allclose(shown[1][finite], raw[1][finite]) and np.allclose(shown[2][finite], raw[2][finite])
    verdict = judge(pairs(n=n, candidate_kl=cand, noise_kl=noise))
    assert verdict.kl_ratio.low >= 0


def test_the_intervals_are_wider_than_a_fixed_sample_interval_and_shrink():
    """A confidence sequence pays for being valid at every look: at 32 sequences its
    half-width is ~1.9x the fixed-sample 95 % normal interval's, and it still shrinks as
    1/sqrt(t) up to a log factor."""
    ts = np.array([8, 32, 128, 512])
    widths = boundary(ts, 0.05 / 3, 32)
    assert 1.5 < widths[1] / (1.96 / np.sqrt(32)) < 2.5
    assert np.all(np.diff(widths) < 0) and widths[3] * np.sqrt(512) < 2 * widths[1] * np.sqrt(32)


def test_a_decision_stands_until_the_opposite_is_proven():
    # 40 sequences at the noise (pass early), then 40 at 1.9x: the interval straddles
    # the 2x limit again, but nothing proves the candidate above it: it stays `pass`.
    noise = noise_like(80, 1)
    cand = np.concatenate([noise_like(40, 2), 1.9 * noise_like(40, 3)])
    verdict = judge(pairs(n=80, candidate_kl=cand, noise_kl=noise))
    first = verdict.trajectory.index("pass")
    assert set(verdict.trajectory[first:]) == {"pass"}, verdict.trajectory
    # Then 200 at 8x: now it is proven above the limit, and it flips once.
    cand = np.concatenate([cand, 8 * noise_like(200, 4)])
    verdict = judge(pairs(n=280, candidate_kl=cand, noise_kl=noise_like(280, 1)))
    assert verdict.status == "fail" and verdict.trajectory[first] == "pass"


def test_a_mild_bug_within_tolerance_passes_and_is_detectably_different():
    """The issue's case: 1.4x the noise floor is within the 2x tolerance but not noise."""
    verdict = judge(pairs(n=200, candidate_kl=noise_like(200, 1) * 1.4 * np.exp(np.random.default_rng(5).normal(0, 0.15, 200)),
                          noise_kl=noise_like(200, 1)))
    assert verdict.status == "pass" and verdict.different is True, verdict.reasons
    assert 1.0 < verdict.kl_ratio.low < 1.4 < verdict.kl_ratio.high < 2.0
    assert verdict.reasons[-1].startswith("detectably different from the noise floor (95% CS): KL ratio at least")


def test_a_control_is_not_detectably_different():
    noise = noise_like(64, 1)
    verdict = judge(pairs(n=64, candidate_kl=noise * np.exp(np.random.default_rng(6).normal(0, 0.15, 64)), noise_kl=noise))
    assert verdict.status == "pass" and verdict.different is False
    assert verdict.reasons[-1].startswith("not detectably different")


def test_the_guards_fail_a_candidate_but_never_pass_it_alone():
    # KL far beyond tolerance, top-1 and hard at the noise: a fail (the KL), never a pass.
    verdict = judge(pairs(candidate_kl=noise_like(32, 2, scale=5.0)))
    assert verdict.checks["excess_top1"] == verdict.checks["excess_hard"] == "pass"
    assert verdict.reasons[-2].startswith("not above the limit") and verdict.status == "fail"


def test_a_calibrated_floor_scales_the_noise():
    p = pairs(candidate_kl=noise_like(32, 1, scale=0.6), noise_kl=noise_like(32, 1))
    assert judge(p).kl_ratio.estimate == pytest.approx(0.6)
    assert judge(p.scaled_noise(0.6, 1.0)).kl_ratio.estimate == pytest.approx(1.0)


def test_the_same_data_always_gives_the_same_verdict():
    a, b = judge(pairs()), judge(pairs())
    assert a == b


def test_non_finite_statistics_are_refused():
    with pytest.raises(ValueError, match="not finite"):
        pairs(candidate_kl=np.full(32, np.nan))


# --- the report -------------------------------------------------------------------------


def test_report_statistics_match_a_direct_computation():
    recs = records(16, scale=1.0)
    report = build_report(recs, model="m", reference="r", noise_dtype="bfloat16", policy=VerdictPolicy())
    kl = np.concatenate([r.candidate.tokens.kl for r in recs])
    dp = np.concatenate([r.candidate.tokens.delta_p for r in recs])
    assert report.candidate.tokens == 16 * TOKENS and report.candidate.sequences == 16
    assert report.candidate.kl.mean == pytest.approx(kl.mean())
    assert report.candidate.kl.stderr == pytest.approx(kl.std(ddof=1) / np.sqrt(kl.size))
    assert report.candidate.kl.percentiles["99.9"] == pytest.approx(np.percentile(kl, 99.9))
    assert report.candidate.kl.percentiles["100"] == pytest.approx(kl.max())
    assert report.candidate.delta_p.rms == pytest.approx(np.sqrt(np.mean(dp**2)))
    assert report.candidate.same_top1.value == pytest.approx(1 - 8 / kl.size)
    firsts = [r.candidate.first_divergence for r in recs if r.candidate.first_divergence is not None]
    assert report.candidate.diverged_by["16"] == pytest.approx(sum(f <= 16 for f in firsts) / 16)
    assert (report.candidate.identical, report.candidate.near_tie, report.candidate.hard) == (8, 8, 0)
    assert report.noise_floor.same_top1.value == 1.0 and report.noise_floor.max_flip_margin is None
    assert report.window.first == 1000.0 and report.window.last == 1015.0
    # The verdict in the report is the pure verdict on the paired columns.
    assert report.verdict.status == judge(paired(recs)).status
    assert report.verdict.kl_ratio.estimate == pytest.approx(kl.sum() / np.concatenate([r.noise.tokens.kl for r in recs]).sum())


def test_without_a_noise_floor_the_verdict_is_inconclusive_and_says_why():
    recs = [ComparedSequence(r.time, r.request_id, r.candidate, None) for r in records(16, scale=5.0)]
    report = build_report(recs, model="m", reference="r", noise_dtype=None, policy=VerdictPolicy())
    assert report.verdict.status == "inconclusive" and "noise floor is off" in report.verdict.reasons[0]
    assert report.noise_floor is None and report.candidate.sequences == 16


def test_the_trajectory_replays_the_verdict_in_arrival_order():
    recs = records(24, scale=6.0)
    verdict = judge(paired(recs))
    points = trajectory_points(verdict.trajectory)
    assert [p.sequences for p in points] == list(range(1, 25))
    assert all(p.status == "inconclusive" for p in points[:7])  # below min_sequences
    assert points[-1].status == verdict.status == "fail"
    # Each point is what the verdict read with only that many sequences.
    table = paired(recs)
    assert [p.status for p in points] == [judge(table.head(p.sequences)).status for p in points]
    assert verdict.decided_at == next(p.sequences for p in points if p.status == "fail")


def test_a_long_trajectory_is_thinned_but_keeps_every_change():
    statuses = ["inconclusive"] * 300 + ["pass"] * 400 + ["fail"] * 300
    points = trajectory_points(statuses)
    assert len(points) <= 256 + 2 and points[-1].sequences == 1000
    assert {(p.sequences, p.status) for p in points} >= {(301, "pass"), (701, "fail")}


def test_an_unbounded_excess_interval_is_said_as_such_and_proven_on_the_contrast():
    """The rotary-layout bug's answers run from 1 token to the limit: the token counts'
    own interval reaches 0, so Fieller's interval for the excess top-1 rate is the whole
    line (it once read "inf to inf"), while the contrast proves the excess."""
    n = 24
    tokens = np.where(np.arange(n) % 8 == 0, 60, 1)  # most answers end after a token, a few run on
    p = PairedSequences(tokens=tokens, candidate_kl=tokens * 1.0, noise_kl=tokens * 1e-3,
                        # the first position flips in every sequence, as it does when every answer diverges at once
                        candidate_top1_different=np.ones(n), noise_top1_different=np.zeros(n),
                        candidate_hard=np.ones(n), noise_hard=np.zeros(n))
    verdict = judge(p)
    assert verdict.excess_top1.low == -np.inf and verdict.excess_top1.high == np.inf
    assert verdict.checks["excess_top1"] == "fail" and verdict.contrasts["excess_top1"].low > 0
    top1 = next(r for r in verdict.reasons if "top-1 disagreement" in r)
    assert "(95% CS -unbounded to unbounded)" in top1 and "inf" not in top1
    assert "excess top-1 above 0, proven on the contrast" in verdict.reasons[-1]
