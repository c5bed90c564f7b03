"""The verdict's error rates under continuous monitoring, by simulation: the project's own
`judge` (shadow/verdict.py) read after every sequence, on synthetic paired streams shaped
like the bf16 control, beside the rules it replaced: the fixed-sample bootstrap (verdict v1)
and decisions read off Fieller's ratio interval (v2; v3 decides on the contrast x - r·d).

    python bench/verdict_error_rates.py [--streams 1000] [--looks 500] [--v1-streams 200]

A stream is `looks` sequences of 16-128 tokens. Per token, KL is heavy-tailed and mostly
shared by the two sides (see `stream`); 3 % of each side's sequences carry a one-sided
near-tie flip worth 40 mean tokens of KL, 5 % a hard divergence. Top-1 disagreements are
binomial at 2 % per token on the noise side, plus the candidate's excess. A candidate is
scaled to a multiple of the tolerance (KL ratio 2x, excess top-1 1 point).

Columns: P(ever fail) and P(ever pass) over the looks; status changes per stream (mean
and max); sequences until the first decision (median) for the stream's final answer;
P(detectably different) by the last look; P(failed by 20/40/80 sequences). v1 is read at
every 5th look from the 8th (its bootstrap, 200 resamples, is too slow at every look of
1000 streams).

The heavy-tailed scenarios are a gross bug's: per-token KL lognormal with σ = 3 on both
sides, independent (garbage continuations share no near-ties), so one sequence of the
noise floor can carry most of its KL; its own interval then reaches 0 and Fieller's
interval for the ratio is unbounded, where the contrast is not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from shadow.verdict import CHECKS, GUARDS, PairedSequences, VerdictPolicy, _columns, _combine, _limits, _sticky, judge, ratio_sequence  # noqa: E402

NOISE_KL_PER_TOKEN = 8e-4
NOISE_TOP1 = 0.02
SHARED_SIGMA, OWN_SIGMA = 1.0, 0.55  # per-token lognormal spreads
SPIKE_RATE, SPIKE = 0.03, 40.0  # one-sided near-tie flips: per sequence, in mean-token KLs
HARD_RATE = 0.05  # hard divergences per sequence, either side
HEAVY_SIGMA = 3.0  # the heavy-tailed scenarios' per-token lognormal spread
BY = (20, 40, 80)  # "failed by n sequences" columns


def stream(rng: np.random.Generator, n: int, kl_ratio: float, excess_top1: float) -> PairedSequences:
    tokens = rng.integers(16, 129, n)
    positions = np.arange(tokens.max()) < tokens[:, None]  # each sequence's tokens, padded to the longest
    # Per-token KL is heavy-tailed (lognormal, σ = 1: a few near-ties carry most of it) and
    # mostly shared between the two sides (both are scored on the same positions); each side
    # adds its own factor (σ = 0.55). Fitted to the real bf16 control (32 x 64 on SmolLM2):
    # per-sequence log-sd 0.20 of KL per token, 0.17 of the candidate / noise ratio.
    shared = rng.lognormal(0.0, SHARED_SIGMA, positions.shape)

    def side(ratio: float) -> tuple[np.ndarray, np.ndarray]:
        own = rng.lognormal(0.0, OWN_SIGMA, positions.shape)
        kl = (shared * own * positions).sum(axis=1) / np.exp((SHARED_SIGMA**2 + OWN_SIGMA**2) / 2)
        # the rare heavy tail: a near-tie only this side flips, one token at SPIKE x the mean
        kl = kl + np.where(rng.random(n) < SPIKE_RATE, SPIKE, 0.0)
        kl = kl / (1 + SPIKE_RATE * SPIKE / tokens.mean())
        return ratio * NOISE_KL_PER_TOKEN * kl, rng.random(n) < HARD_RATE

    noise_kl, noise_hard = side(1.0)
    cand_kl, cand_hard = side(kl_ratio)
    return PairedSequences(
        tokens=tokens, candidate_kl=cand_kl, noise_kl=noise_kl,
        candidate_top1_different=rng.binomial(tokens, min(NOISE_TOP1 + excess_top1, 1.0)),
        noise_top1_different=rng.binomial(tokens, NOISE_TOP1),
        candidate_hard=cand_hard, noise_hard=noise_hard,
    )


def heavy_stream(rng: np.random.Generator, n: int, kl_ratio: float, excess_top1: float) -> PairedSequences:
    """Per-token KL lognormal (σ = 3) on each side, independent; the candidate's scaled."""
    tokens = rng.integers(16, 129, n)
    positions = np.arange(tokens.max()) < tokens[:, None]

    def side(ratio: float) -> np.ndarray:
        per_token = rng.lognormal(0.0, HEAVY_SIGMA, positions.shape) / np.exp(HEAVY_SIGMA**2 / 2)
        return ratio * NOISE_KL_PER_TOKEN * (per_token * positions).sum(axis=1)

    noise_kl, cand_kl = side(1.0), side(kl_ratio)
    return PairedSequences(
        tokens=tokens, candidate_kl=cand_kl, noise_kl=noise_kl,
        candidate_top1_different=rng.binomial(tokens, min(NOISE_TOP1 + excess_top1, 1.0)),
        noise_top1_different=rng.binomial(tokens, NOISE_TOP1),
        candidate_hard=rng.random(n) < HARD_RATE, noise_hard=rng.random(n) < HARD_RATE,
    )


def fieller_statuses(p: PairedSequences, policy: VerdictPolicy) -> list[str]:
    """Verdict v2: each check decided where Fieller's ratio interval lies against its limit
    (git show 29d7c0b:shadow/verdict.py); same boundary, burn-in and stickiness as v3."""
    n = p.sequences
    ready = (np.arange(1, n + 1) >= policy.min_sequences) & (np.cumsum(p.tokens) >= policy.min_tokens)
    columns, limits = _columns(p, policy), _limits(policy)
    checks = {}
    for name in CHECKS:
        _, low, high = ratio_sequence(*columns[name], policy)
        checks[name] = _sticky(low - limits[name], high - limits[name], ready, guard=name in GUARDS)
    return [str(s) for s in _combine(checks)]


def v1_statuses(p: PairedSequences, policy: VerdictPolicy, looks: list[int], rng: np.random.Generator) -> list[str]:
    """Verdict v1: a 95 % bootstrap over sequences re-run at each look; fail when a lower
    bound is above its limit, pass when the KL ratio's upper bound and the two excess
    estimates are within theirs (git show 099fc8c:shadow/verdict.py)."""
    out = []
    for n in looks:
        w = np.vstack([np.ones(n), rng.multinomial(n, np.full(n, 1 / n), size=200)])
        kl = (w @ p.candidate_kl[:n]) / np.maximum(w @ p.noise_kl[:n], policy.noise_kl_floor * (w @ p.tokens[:n]))
        top1 = (w @ (p.candidate_top1_different[:n] - p.noise_top1_different[:n])) / (w @ p.tokens[:n])
        hard = (w @ (p.candidate_hard[:n] - p.noise_hard[:n])) / n
        stats = [(kl, policy.kl_ratio_max, True), (top1, policy.excess_top1_max, False), (hard, policy.excess_hard_max, False)]
        checks = []
        for values, limit, by_upper in stats:
            low, high = np.quantile(values[1:], [0.025, 0.975])
            checks.append("fail" if low > limit else "pass" if (high if by_upper else values[0]) <= limit else "inconclusive")
        out.append("fail" if "fail" in checks else "pass" if set(checks) == {"pass"} else "inconclusive")
    return out


def summarise(trajectories: list[list[str]], different: list[bool], first_look: int, every: int = 1) -> dict[str, str]:
    if not trajectories:
        return {}
    ever_fail = np.mean([("fail" in t) for t in trajectories])
    ever_pass = np.mean([("pass" in t) for t in trajectories])
    changes = [sum(a != b for a, b in zip(t, t[1:])) for t in trajectories]
    first = [next((i for i, s in enumerate(t) if s != "inconclusive"), None) for t in trajectories]
    decided = [first_look + every * i for i in first if i is not None]
    return {
        "P(ever fail)": f"{ever_fail:.3f}", "P(ever pass)": f"{ever_pass:.3f}",
        "changes mean/max": f"{np.mean(changes):.2f}/{max(changes)}",
        "first decision (median seqs)": f"{np.median(decided):.0f}" if decided else "never",
        "undecided at end": f"{np.mean([t[-1] == 'inconclusive' for t in trajectories]):.3f}",
        "P(different)": "-" if not different else f"{np.mean(different):.3f}",
        **{f"failed by {n}": f"{np.mean([_failed_by(t, n - first_look, every) for t in trajectories]):.2f}" for n in BY},
    }


def _failed_by(trajectory: list[str], index: int, every: int) -> bool:
    return "fail" in trajectory[: index // every + 1]


SCENARIOS = [  # name, stream, KL ratio, excess top-1, the right answer
    ("control (1x noise)", stream, 1.0, 0.0, "pass"),
    ("KL at 0.9x tolerance (1.8x)", stream, 1.8, 0.0, "pass"),
    ("KL at 1.0x tolerance (2.0x)", stream, 2.0, 0.0, "either"),
    ("KL at 1.1x tolerance (2.2x)", stream, 2.2, 0.0, "fail"),
    ("top-1 at 0.8x tolerance (+0.8 pt)", stream, 1.0, 0.008, "pass"),
    ("top-1 at 1.0x tolerance (+1 pt)", stream, 1.0, 0.010, "either"),
    ("KL 1.5x noise", stream, 1.5, 0.0, "pass"),
    ("KL 3x noise", stream, 3.0, 0.0, "fail"),
    ("KL 5x noise", stream, 5.0, 0.0, "fail"),
    ("heavy-tailed floor (σ 3), control 1x", heavy_stream, 1.0, 0.0, "pass"),
    ("heavy-tailed floor (σ 3), KL 1.8x", heavy_stream, 1.8, 0.0, "pass"),
    ("heavy-tailed floor (σ 3), KL 20x", heavy_stream, 20.0, 0.0, "fail"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--looks", type=int, default=500)
    parser.add_argument("--v1-streams", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    policy = VerdictPolicy()
    print(f"{args.streams} streams x {args.looks} looks (v1: {args.v1_streams} streams, every 5th look); "
          f"limits KL {policy.kl_ratio_max}x, top-1 {100 * policy.excess_top1_max:g} pt; confidence {policy.confidence}")
    table = []
    for name, make, ratio, top1, right in tqdm(SCENARIOS, desc="scenarios"):
        rng = np.random.default_rng(args.seed)
        streams = [make(rng, args.looks, ratio, top1) for _ in range(args.streams)]
        verdicts = [judge(s, policy) for s in tqdm(streams, desc=name, leave=False)]
        rows = {"v3 (contrast)": summarise([v.trajectory[policy.min_sequences - 1:] for v in verdicts],
                                           [bool(v.different) for v in verdicts], policy.min_sequences)}
        rows["v2 (Fieller)"] = summarise([fieller_statuses(s, policy)[policy.min_sequences - 1:] for s in streams],
                                         [], policy.min_sequences)
        looks = list(range(policy.min_sequences, args.looks + 1, 5))
        rows["v1 (bootstrap)"] = summarise(
            [v1_statuses(s, policy, looks, rng) for s in tqdm(streams[: args.v1_streams], leave=False)], [],
            policy.min_sequences, every=5)
        table += [(name, right, rule, row) for rule, row in rows.items() if row]
    header = ["scenario", "right answer", "rule", *table[0][3]]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, right, rule, row in table:
        print(f"| {name} | {right} | {rule} | " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    main()
