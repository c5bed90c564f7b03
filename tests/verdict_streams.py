"""Synthetic compared sequences and an engine calibration, shared by the tests of the
verdict and its report (tests/unit/test_shadow_verdict.py), the calibration file
(tests/unit/test_calibration.py), the verdict's gauges (tests/unit/test_shadow_recording.py)
and the chart's calibration mount (tests/helm/test_chart_render.py)."""

from __future__ import annotations

import numpy as np

from shadow.calibration import Calibration, EngineFacts
from shadow.compare import SequenceComparison, TokenDrift
from shadow.history import ComparedSequence

TOKENS = 64  # compared tokens per synthetic sequence

# The setup a synthetic calibration was measured on.
FACTS = EngineFacts(engine="vllm", engine_version="0.20.0", dtype="bfloat16", compile_mode="compiled", device="cpu",
                    reference="SmolLM2-135M-Instruct")


def comparison(kl: np.ndarray, delta_p: np.ndarray, top1_same: np.ndarray, first: int | None, result: str,
               margin: float | None = None) -> SequenceComparison:
    return SequenceComparison(len(kl), first, result, margin, TokenDrift(kl, delta_p, np.sqrt(kl), np.sqrt(kl), top1_same))


def records(n: int, scale: float, seed: int = 0) -> list[ComparedSequence]:
    """`n` sequences of TOKENS tokens: the noise floor's KL ~8e-4 nats a token, the
    candidate's `scale` times that; every other candidate sequence flips its top-1 once."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        noise_kl, cand_kl = rng.exponential(8e-4, TOKENS), scale * rng.exponential(8e-4, TOKENS)
        same = np.ones(TOKENS, dtype=bool)
        first = int(rng.integers(0, TOKENS)) if i % 2 else None
        if first is not None:
            same[first] = False
        cand = comparison(cand_kl, rng.normal(0, 0.01, TOKENS), same, first, "near_tie" if first is not None else "identical",
                          0.05 if first is not None else None)
        noise = comparison(noise_kl, rng.normal(0, 0.01, TOKENS), np.ones(TOKENS, dtype=bool), None, "identical")
        out.append(ComparedSequence(1000.0 + i, f"r{i}", cand, noise))
    return out


def calibration(**overrides) -> Calibration:
    """An engine measured at 0.58x the transformers noise floor, on FACTS."""
    values = dict(facts=FACTS, kl_ratio=0.58, kl_ratio_low=0.54, kl_ratio_high=0.62, top1_ratio=0.8, sequences=40,
                  tokens=2560, measured_at="2026-12-02T07:00:00+00:00")
    return Calibration(**{**values, **overrides})
