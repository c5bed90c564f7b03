"""POST /v1/chat/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from server.serving.context import ServingContext, new_request_id, sse_response
from server.serving.generation import Job, collect, plan_jobs, run_jobs, usage
from server.serving.logprobs import chat_logprobs
from server.serving.shadowing import Chunks, ShadowTap, tapped


class ChatHandler:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, request: ChatCompletionRequest, shadow_header: str | None = None):
        ctx = self.ctx
        ctx.check_model(request.model)
        prompt = ctx.renderer.chat(request.messages)
        request_id = new_request_id("chatcmpl")
        tap = ShadowTap.open(ctx.shadow, shadow_header, request_id, ctx.model_name)
        jobs = plan_jobs(
            request, [prompt], ctx.engine, max_n=ctx.max_n, max_logprobs=ctx.max_logprobs,
            shadow_k=tap.top_k if tap else None,
        )
        stream = tapped(run_jobs(ctx.engine, jobs, request_id), jobs, tap)
        if request.stream:
            return sse_response(self._stream(request, prompt, jobs, stream, request_id))
        choices = await collect(jobs, stream)
        k = request.logprobs_k
        return ChatCompletionResponse(
            id=request_id,
            model=ctx.model_name,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    logprobs=None if k is None else chat_logprobs(c.token_ids, c.logprobs, k, ctx.renderer.token_text),
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage=usage([prompt], sum(len(c.token_ids) for c in choices)),
        )

    async def _stream(
        self, request: ChatCompletionRequest, prompt: list[int], jobs: list[Job], stream: Chunks, request_id: str
    ) -> AsyncIterator[ChatCompletionChunk]:
        ctx, k = self.ctx, request.logprobs_k

        def chunk(choices: list[ChatChunkChoice], **extra) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, model=ctx.model_name, choices=choices, **extra)

        for job in jobs:
            yield chunk([ChatChunkChoice(index=job.index, delta={"role": "assistant", "content": ""})])
        completion_tokens = 0
        async for index, piece in stream:
            completion_tokens += len(piece.token_ids)
            if not (piece.text or piece.finish_reason or (k is not None and piece.token_ids)):
                continue
            logprobs = None
            if k is not None:
                logprobs = chat_logprobs(piece.token_ids, piece.logprobs or [], k, ctx.renderer.token_text)
            yield chunk(
                [
                    ChatChunkChoice(
                        index=index,
                        delta={"content": piece.text},
                        logprobs=logprobs,
                        finish_reason=piece.finish_reason,
                    )
                ]
            )
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], usage=usage([prompt], completion_tokens))
