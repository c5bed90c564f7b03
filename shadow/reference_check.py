"""The reference's self-check: before anything is judged against it, the reference and the
candidate each score a short natural-text probe, teacher-forced, and the reference must
not be far worse than its candidate.

Why this rule: a candidate and its reference are meant to be the same function (a
conversion, a merge, a dtype). Precision moves the probe's mean log-loss by about a
thousandth of a nat per token (bf16 on SmolLM2: docs/shadow.md, "Reference trust"); a conversion
bug makes the *candidate* worse. So a reference whose log-loss exceeds its candidate's by
more than `max_excess_nats` per token is the broken side — remote code under the wrong
transformers, rotary tables never materialised, a wrong config — and judging the
candidate against it would call a correct conversion a gross bug. The check also refuses
a reference with parameters or buffers that are unmaterialised or non-finite.

`judge_reference` is pure (log-probs in, a decision out); `check_reference` runs the
probe on a scorer and on whatever computes the candidate's log-probs (injected: the
engine lives on the server side).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
from pydantic import BaseModel

from shadow.scoring import ScoreItem, Scorer, ShadowReferenceError

# Plain, varied English prose: what any language model has seen plenty of.
PROBE = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every evening the keeper "
    "climbed the narrow stairs, cleaned the lamp and wound the clockwork that turned the lens. Ships passing in "
    "the night saw its beam sweep across the water and knew where the rocks were. When the town built a new "
    "harbour, the lighthouse was no longer needed, but people still walked up the hill on Sunday afternoons to "
    "look at the sea. Children raced each other to the gate, and their parents sat on the bench by the wall, "
    "talking about the weather, the price of bread and the news from the city."
)
MAX_EXCESS_NATS = 0.25  # per token: perplexity x1.28; precision noise is ~1e-3 (see the module's docstring)
MAX_PROBE_TOKENS = 512  # per probe text


class ReferenceUntrustedError(ShadowReferenceError):
    """The reference failed its self-check: nothing is judged against it."""


class ReferenceCheck(BaseModel):
    trusted: bool
    reasons: list[str]
    tokens: int  # scored probe tokens
    reference_perplexity: float | None
    candidate_perplexity: float | None
    excess_nats: float | None  # mean log-loss per token, reference minus candidate
    max_excess_nats: float
    integrity_problems: list[str] = []

    def summary(self) -> str:
        return (f"probe perplexity: reference {_fmt(self.reference_perplexity)}, candidate "
                f"{_fmt(self.candidate_perplexity)} over {self.tokens} tokens (excess "
                f"{_fmt(self.excess_nats)} nats/token, limit {self.max_excess_nats:g})")


def _fmt(value: float | None) -> str:
    return "not finite" if value is None else f"{value:.4g}"


def judge_reference(reference_logprobs: np.ndarray, candidate_logprobs: np.ndarray, max_excess_nats: float,
                    integrity: Sequence[str] = ()) -> ReferenceCheck:
    """Both arrays: the log-prob each side gives the probe's next token, position by position."""
    ref = np.asarray(reference_logprobs, dtype=np.float64)
    cand = np.asarray(candidate_logprobs, dtype=np.float64)
    if ref.shape != cand.shape or ref.size == 0:
        raise ValueError(f"probe log-probs do not pair up ({ref.shape} vs {cand.shape})")
    reasons = [f"reference {problem}" for problem in integrity]
    ref_loss, cand_loss = -float(ref.mean()), -float(cand.mean())
    excess = ref_loss - cand_loss if math.isfinite(ref_loss) and math.isfinite(cand_loss) else None
    if not math.isfinite(ref_loss):
        reasons.append("the reference's log-probs on the probe are not finite")
    elif excess is not None and excess > max_excess_nats:
        reasons.append(
            f"the reference is far worse than its candidate on the probe text: perplexity {math.exp(ref_loss):.4g} "
            f"against {math.exp(cand_loss):.4g} ({excess:.3g} nats/token more, limit {max_excess_nats:g}); "
            "a conversion bug makes the candidate worse, not the reference, so the reference is the likely broken "
            "side (its own code under this transformers, a wrong config, unmaterialised tables)")
    return ReferenceCheck(
        trusted=not reasons, reasons=reasons, tokens=int(ref.size),
        reference_perplexity=math.exp(ref_loss) if math.isfinite(ref_loss) and ref_loss < 700 else None,
        candidate_perplexity=math.exp(cand_loss) if math.isfinite(cand_loss) and cand_loss < 700 else None,
        excess_nats=excess, max_excess_nats=max_excess_nats, integrity_problems=list(integrity),
    )


CandidateLogprobs = Callable[[list[int]], Awaitable[list[float]]]


async def check_reference(scorer: Scorer, candidate_logprobs: CandidateLogprobs, probes: Sequence[list[int]],
                          max_excess_nats: float = MAX_EXCESS_NATS) -> ReferenceCheck:
    """Score each probe (token ids, at least two) on both sides, pooled over tokens."""
    probes = [ids[:MAX_PROBE_TOKENS] for ids in probes if len(ids) >= 2]
    if not probes:
        raise ValueError("the probe text tokenized to fewer than two tokens")
    items = [ScoreItem(ids[:1], ids[1:], [[t] for t in ids[1:]]) for ids in probes]
    scored = await scorer.score(items, top_m=1)
    ref = [s.logprobs[t] for item, seq in zip(items, scored) for t, s in zip(item.output_ids, seq.reference)]
    cand = [lp for ids in probes for lp in await candidate_logprobs(ids)]
    return judge_reference(np.array(ref), np.array(cand), max_excess_nats, scorer.integrity_problems)
