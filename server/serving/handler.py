"""The request flow chat and completions share: limits, prompts (off the event loop),
shadow admission, engine jobs, then a response or a stream that starts with the
engine's first output. Each endpoint says only how its prompts and chunks look."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Generic, TypeVar

from pydantic import BaseModel

from server.engines import EngineChunk, LoraAdapter
from server.protocol import ChatCompletionRequest, CompletionRequest, Usage
from server.serving.context import ServingContext, new_request_id
from server.serving.generation import Choice, Job, plan_jobs, run_jobs, usage
from server.serving.shadowing import Chunks, ShadowTap, collected, tapped
from server.serving.sse import EventStream

RequestT = TypeVar("RequestT", ChatCompletionRequest, CompletionRequest)


class EndpointHandler(ABC, Generic[RequestT]):
    id_prefix: str

    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, request: RequestT, shadow_header: str | None = None):
        ctx = self.ctx
        ctx.validator.check_request(request)
        adapter = ctx.resolve(request.model)  # a mounted LoRA adapter, or None for the base
        # Chat templates and tokenizers take seconds on a multi-megabyte prompt: not on the loop.
        prompts = await asyncio.to_thread(self.prompts, request)
        request_id = new_request_id(self.id_prefix)
        tap = ShadowTap.open(ctx.shadow, shadow_header, request_id, request.model, adapter)
        try:
            jobs = plan_jobs(
                request, prompts, ctx.engine, validator=ctx.validator,
                shadow_k=tap.top_k if tap else None,
            )
            jobs = ctx.validator.fit_budget(jobs, explicit=request.completion_limit is not None, n=request.n,
                                            prompts=len(prompts))
            scored = await self.score_prompts(request, prompts, request_id, adapter)
        except BaseException:  # refused: a sampled request still ends as exactly one shadow outcome
            if tap is not None:
                tap.abandon()
            raise
        if all(job.options.max_tokens == 0 for job in jobs):  # the prompt scored, nothing to generate
            if tap is not None:
                tap.abandon()
            choices = [Choice(job.index, job.prompt_ids, finish_reason="length") for job in jobs]
        elif request.stream:
            # Nothing is sent before the engine's first output: an engine-side refusal is
            # still an HTTP error, and a client's time to first token is the engine's.
            stream = await started(tapped(run_jobs(ctx.engine, jobs, request_id, adapter), jobs, tap))
            return EventStream(self._events(request, prompts, jobs, stream, request_id), upstream=stream)
        else:  # accumulated once, here; a sampled request's tap is handed these choices
            choices = await collected(jobs, run_jobs(ctx.engine, jobs, request_id, adapter), tap)
        for choice in choices if scored is not None else ():
            choice.prompt_logprobs = scored[choice.index // request.n]
        return await asyncio.to_thread(self.response, request, prompts, choices, request_id)

    async def score_prompts(self, request: RequestT, prompts: list[list[int]], request_id: str,
                            adapter: LoraAdapter | None = None) -> list[list[dict[int, float]]] | None:
        """Teacher-forced log-probs over each prompt, when the endpoint's request asks."""
        return None

    async def _events(
        self, request: RequestT, prompts: list[list[int]], jobs: list[Job], stream: Chunks, request_id: str
    ) -> AsyncIterator[BaseModel]:
        """Forwards pieces only (a sampled stream's choices are accumulated by its tee). The
        stream is closed here on every exit: ended, client gone, a failed event."""
        async with aclosing(stream):
            for event in self.opening(request, jobs, request_id):
                yield event
            completion_tokens, sent = 0, {job.index: 0 for job in jobs}  # characters sent per choice
            async for index, piece in stream:
                completion_tokens += len(piece.token_ids)
                if piece.text or piece.finish_reason or (request.logprobs_k is not None and piece.token_ids):
                    yield self.chunk(request, index, piece, request_id, sent[index])
                    sent[index] += len(piece.text)
        if request.stream_options and request.stream_options.include_usage:
            yield self.usage_chunk(request, request_id, usage(prompts, completion_tokens))

    def token_text(self, request: RequestT):
        """How log-prob entries name tokens: their text, or vLLM's `token_id:N` on request."""
        return _token_id if request.return_tokens_as_token_ids else self.ctx.renderer.token_text

    @abstractmethod
    def prompts(self, request: RequestT) -> list[list[int]]:
        """Token ids of each prompt (blocking: runs on a worker thread)."""

    @abstractmethod
    def response(self, request: RequestT, prompts: list[list[int]], choices: list[Choice], request_id: str) -> BaseModel:
        """The whole answer (blocking: log-prob formatting runs on a worker thread)."""

    def opening(self, request: RequestT, jobs: list[Job], request_id: str) -> list[BaseModel]:
        """Events sent once the engine has started, before its first piece."""
        return []

    @abstractmethod
    def chunk(self, request: RequestT, index: int, piece: EngineChunk, request_id: str, offset: int) -> BaseModel:
        """One streamed piece of choice `index`, `offset` characters into its text."""

    @abstractmethod
    def usage_chunk(self, request: RequestT, request_id: str, totals: Usage) -> BaseModel:
        """The last event when the client asked for usage."""


async def started(stream: Chunks) -> Started:
    """Wait for the stream's first item; errors before it raise here, as HTTP errors."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        return Started(None, stream)
    except BaseException:
        await stream.aclose()  # ended by its own error already (a no-op): closed explicitly all the same
        raise
    return Started(first, stream)


class Started:
    """A stream whose first item `started` has read: that item, then the rest. Closing it
    closes the stream (aborting the engine requests) whether or not it was read further,
    which closing a generator that never ran would not do."""

    def __init__(self, first: tuple[int, EngineChunk] | None, stream: Chunks):
        self._first, self._stream = first, stream

    def __aiter__(self) -> Started:
        return self

    async def __anext__(self) -> tuple[int, EngineChunk]:
        if (first := self._first) is not None:
            self._first = None
            return first
        return await anext(self._stream)

    async def aclose(self) -> None:
        self._first = None
        await self._stream.aclose()


def _token_id(token_id: int) -> str:
    return f"token_id:{token_id}"
