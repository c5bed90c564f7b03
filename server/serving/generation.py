"""What chat and completions share: turning a request into engine jobs, running the
n choices of each prompt concurrently, and collecting finished choices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from server.engines import Engine, EngineChunk, EngineDeadError, EngineInputError, LoraAdapter, SamplingOptions
from server.errors import InvalidRequestError, ServiceUnavailableError
from server.protocol import ChatCompletionRequest, CompletionRequest, Usage
from server.serving.validation import RequestValidator

_DONE = object()


@dataclass
class Job:
    """One sequence to generate: choice `index` of the response."""

    index: int
    prompt_ids: list[int]
    options: SamplingOptions


@dataclass
class Choice:
    """A choice being accumulated from its chunks."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    # Teacher-forced over the prompt (positions 1..n-1), when the request asked for them.
    prompt_logprobs: list[dict[int, float]] | None = None

    def add(self, chunk: EngineChunk) -> None:
        self.token_ids += chunk.token_ids
        self.text += chunk.text
        self.logprobs += chunk.logprobs or []
        self.finish_reason = chunk.finish_reason or self.finish_reason


def plan_jobs(
    request: ChatCompletionRequest | CompletionRequest,
    prompts: Sequence[list[int]],
    engine: Engine,
    *,
    validator: RequestValidator,
    shadow_k: int | None = None,
) -> list[Job]:
    """Check the request against the validator's limits (choices, log-probs, each prompt's
    room in the engine's context) and make one job per choice.

    Choices are numbered prompt-major (prompt p, sample i -> p * n + i), as OpenAI does.
    Seeds follow vLLM: choice i of a seeded request uses seed + i. A shadow-sampled
    request (`shadow_k`) asks the engine for max(client k, shadow k) log-probs.
    """
    validator.check_choices(request)
    k = request.logprobs_k
    engine_k = k if shadow_k is None else max(k or 0, shadow_k)
    prompt_param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    jobs = []
    for p, prompt_ids in enumerate(prompts):
        max_tokens = validator.completion_budget(len(prompt_ids), request.completion_limit, engine.max_model_len,
                                                 prompt_param)
        for i in range(request.n):
            options = SamplingOptions(
                max_tokens=max_tokens,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p,
                seed=None if request.seed is None else (request.seed + i) % 2**63,
                stop=tuple(request.stop),
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                logprobs=engine_k,
                ignore_eos=request.ignore_eos,
                min_tokens=request.min_tokens,
                top_k=max(request.top_k or 0, 0),
                min_p=request.min_p or 0.0,
                repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            )
            jobs.append(Job(p * request.n + i, prompt_ids, options))
    return jobs


async def run_jobs(engine: Engine, jobs: list[Job], request_id: str,
                   adapter: LoraAdapter | None = None) -> AsyncIterator[tuple[int, EngineChunk]]:
    """Run all jobs concurrently (on the base, or with a mounted adapter) and yield
    (choice index, chunk) as they arrive.

    Closing this iterator (client gone, error) cancels every job; each engine stream's
    own cleanup aborts its engine request. One job (most requests) is read directly:
    no task and no queue hop per token.
    """
    if len(jobs) == 1:
        job = jobs[0]
        stream = engine.generate(job.prompt_ids, job.options, f"{request_id}-{job.index}", adapter)
        try:
            async for chunk in stream:
                yield job.index, chunk
        except (EngineInputError, EngineDeadError) as exc:
            raise _served_error(exc) from exc
        finally:
            await stream.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:
        try:
            # Closed here on every exit (a cancelled pump included): the engine request aborts now, not at GC.
            async with aclosing(engine.generate(job.prompt_ids, job.options, f"{request_id}-{job.index}", adapter)) as chunks:
                async for chunk in chunks:
                    await queue.put((job.index, chunk))
        except Exception as exc:
            await queue.put((job.index, exc))
        finally:
            await queue.put((job.index, _DONE))

    tasks = [asyncio.create_task(pump(job)) for job in jobs]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, (EngineInputError, EngineDeadError)):
                raise _served_error(item) from item
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _served_error(exc: EngineInputError | EngineDeadError) -> Exception:
    """An engine's refusal as the client sees it: a refused parameter is the client's
    error (400), a dead engine a 503."""
    if isinstance(exc, EngineInputError):
        return InvalidRequestError(str(exc))
    return ServiceUnavailableError(f"{exc}; this server is restarting")


def new_choices(jobs: list[Job]) -> dict[int, Choice]:
    """One empty choice per job, by index, for the one step that accumulates a request's
    stream: `collect` for a whole response, the shadow's tee for a sampled stream."""
    return {job.index: Choice(job.index, job.prompt_ids) for job in jobs}


def in_order(choices: dict[int, Choice]) -> list[Choice]:
    return [choices[i] for i in sorted(choices)]


async def collect(jobs: list[Job], stream: AsyncIterator[tuple[int, EngineChunk]]) -> list[Choice]:
    """A whole response's choices, accumulated once (a sampled request's tap is handed these:
    serving/shadowing.py `collected`). The stream is closed here however this ends."""
    choices = new_choices(jobs)
    async with aclosing(stream):
        async for index, chunk in stream:
            choices[index].add(chunk)
    return in_order(choices)


def usage(prompts: Sequence[list[int]], completion_tokens: int) -> Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
