"""Turning requests into engine jobs, and running them (with a scripted engine)."""

from __future__ import annotations

import asyncio

import pytest

from server.engines import EngineChunk, EngineInputError
from server.errors import InvalidRequestError
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.serving.generation import collect, plan_jobs, run_jobs
from server.serving.validation import RequestValidator
from tests.fakes import ScriptedEngine

# The limits' own checks, and plan_jobs applying them: tests/unit/test_serving_validation.py.
LIMITS = RequestValidator(max_n=4, max_logprobs=5)


def chat(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **fields})


def test_budget_defaults_to_the_rest_of_the_context():
    (job,) = plan_jobs(chat(), [[1] * 30], ScriptedEngine(), validator=LIMITS)
    assert job.options.max_tokens == 70


def test_choices_are_prompt_major_and_seeded_per_choice():
    request = CompletionRequest(model="m", prompt=["a", "b"], n=2, seed=10, temperature=0.7)
    jobs = plan_jobs(request, [[1], [2]], ScriptedEngine(), validator=LIMITS)
    assert [(j.index, j.prompt_ids, j.options.seed) for j in jobs] == [(0, [1], 10), (1, [1], 11), (2, [2], 10), (3, [2], 11)]
    assert all(j.options.temperature == 0.7 and j.options.max_tokens == 16 for j in jobs)


def test_collect_accumulates_each_choice():
    engine = ScriptedEngine()
    jobs = plan_jobs(chat(n=2), [[1]], engine, validator=LIMITS)
    choices = asyncio.run(collect(jobs, run_jobs(engine, jobs, "r")))
    assert [(c.index, c.token_ids, c.text, c.finish_reason) for c in choices] == [
        (0, [5, 6], "xy", "length"), (1, [5, 6], "xy", "length")
    ]


def test_engine_input_error_becomes_a_client_error():
    engine = ScriptedEngine(error=EngineInputError("bad seed"))
    jobs = plan_jobs(chat(), [[1]], engine, validator=LIMITS)
    with pytest.raises(InvalidRequestError, match="bad seed"):
        asyncio.run(collect(jobs, run_jobs(engine, jobs, "r")))


def test_closing_the_stream_closes_every_engine_request():
    engine = ScriptedEngine(script=[EngineChunk([i], "t") for i in range(1000)])
    jobs = plan_jobs(chat(n=3), [[1]], engine, validator=LIMITS)

    async def read_two_then_leave():
        stream = run_jobs(engine, jobs, "r")
        await anext(stream)
        await anext(stream)
        await stream.aclose()

    asyncio.run(read_two_then_leave())
    assert sorted(engine.closed) == ["r-0", "r-1", "r-2"]
