"""The reference's self-check as the server and `verify` run it: the probe text through the
candidate's engine (teacher-forced prompt log-probs) and through the reference scorer,
judged by `shadow.reference_check`."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence

from server.engines import Engine
from server.serving.prompts import PromptRenderer
from shadow.reference_check import PROBE, ReferenceCheck, check_reference
from shadow.scoring import Scorer


async def engine_token_logprobs(engine: Engine, ids: list[int]) -> list[float]:
    """The candidate's raw log-prob of each next token of `ids` (positions 1..n-1)."""
    entries = await engine.prompt_logprobs(ids, 0, f"reference-check-{uuid.uuid4().hex}")
    return [entry[token] for entry, token in zip(entries, ids[1:])]


def reference_self_check(engine: Engine, renderer: PromptRenderer, scorer: Scorer, max_excess_nats: float,
                         extra_probes: Sequence[list[int]] = ()) -> Callable[[], Awaitable[ReferenceCheck]]:
    """The check to hand to the shadow path: the built-in probe (and `extra_probes`, e.g.
    verify's corpus), tokenized by the candidate's tokenizer, scored on both sides."""
    probes = [renderer.text(PROBE), *extra_probes]
    return lambda: check_reference(scorer, lambda ids: engine_token_logprobs(engine, ids), probes, max_excess_nats)
