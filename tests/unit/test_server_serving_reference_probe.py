"""The reference's self-check as the server runs it (server/serving/reference_probe.py):
the probe text tokenized by the candidate's tokenizer, the candidate's teacher-forced
log-prob of each next token from its engine, the reference's from its scorer, judged by
shadow/reference_check.py. Engine, tokenizer and reference are doubles here."""

from __future__ import annotations

import asyncio
import math

import pytest

from server.serving.reference_probe import engine_token_logprobs, reference_self_check
from shadow.reference_check import PROBE
from tests.scorers import LP, EchoScorer

IDS = [1, 2, 1, 1, 2, 2, 1, 2]


class Engine:
    """Gives each prompt token its log-prob in `logprobs` (and a distractor), recording what
    it was asked."""

    def __init__(self, logprobs: dict[int, float]):
        self.logprobs = logprobs
        self.calls: list[tuple[list[int], int, str]] = []

    async def prompt_logprobs(self, ids, k, request_id, adapter=None):
        self.calls.append((ids, k, request_id))
        return [{token: self.logprobs[token], 99: -9.0} for token in ids[1:]]


class Renderer:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def text(self, prompt: str) -> list[int]:
        self.texts.append(prompt)
        return IDS


def test_the_engine_gives_the_log_prob_of_each_next_token():
    engine = Engine({1: -0.5, 2: -1.5})
    assert asyncio.run(engine_token_logprobs(engine, IDS)) == [-1.5, -0.5, -0.5, -1.5, -1.5, -0.5, -1.5]
    ((ids, k, request_id),) = engine.calls
    assert ids == IDS and k == 0 and request_id.startswith("reference-check-")


def test_a_reference_as_good_as_its_candidate_is_trusted_one_far_worse_is_not():
    renderer = Renderer()
    agreeing = Engine(LP)  # the echo reference's own log-probs
    check = asyncio.run(reference_self_check(agreeing, renderer, EchoScorer(), max_excess_nats=0.25)())
    assert renderer.texts == [PROBE] and check.trusted and check.tokens == len(IDS) - 1 and check.excess_nats == 0
    sharp = Engine({1: math.log(0.99), 2: math.log(0.99)})  # near-certain where the reference spreads its mass
    check = asyncio.run(reference_self_check(sharp, renderer, EchoScorer(), max_excess_nats=0.25)())
    assert not check.trusted and "the reference is far worse than its candidate" in check.reasons[0]
    assert check.excess_nats == pytest.approx(-(3 * LP[1] + 4 * LP[2]) / 7 - -math.log(0.99))


def test_extra_probes_are_scored_with_the_built_in_one():
    engine = Engine(LP)
    check = asyncio.run(reference_self_check(engine, Renderer(), EchoScorer(), 1.0, extra_probes=[[2, 1, 1]])())
    assert [ids for ids, _, _ in engine.calls] == [IDS, [2, 1, 1]] and check.tokens == len(IDS) - 1 + 2
