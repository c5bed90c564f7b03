"""POST /v1/completions."""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.errors import InvalidRequestError
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from server.serving.context import ServingContext, new_request_id, sse_response
from server.serving.generation import Job, collect, plan_jobs, run_jobs, usage
from server.serving.logprobs import completion_logprobs
from server.serving.shadowing import Chunks, ShadowTap, tapped


class CompletionHandler:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def create(self, request: CompletionRequest, shadow_header: str | None = None):
        ctx = self.ctx
        ctx.check_model(request.model)
        prompts = self._prompts(request.prompt)
        request_id = new_request_id("cmpl")
        tap = ShadowTap.open(ctx.shadow, shadow_header, request_id, ctx.model_name)
        jobs = plan_jobs(
            request, prompts, ctx.engine, max_n=ctx.max_n, max_logprobs=ctx.max_logprobs,
            shadow_k=tap.top_k if tap else None,
        )
        stream = tapped(run_jobs(ctx.engine, jobs, request_id), jobs, tap)
        if request.stream:
            return sse_response(self._stream(request, prompts, jobs, stream, request_id))
        choices = await collect(jobs, stream)
        k = request.logprobs_k
        return CompletionResponse(
            id=request_id,
            model=ctx.model_name,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    logprobs=None
                    if k is None
                    else completion_logprobs(c.token_ids, c.logprobs, k, ctx.renderer.token_text),
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage=usage(prompts, sum(len(c.token_ids) for c in choices)),
        )

    def _prompts(self, prompt: str | list) -> list[list[int]]:
        """A string, a token-id list, or a batch of either."""
        renderer = self.ctx.renderer
        batch = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        ids = [renderer.text(p) if isinstance(p, str) else renderer.check_ids(p) for p in batch]
        if any(not p for p in ids):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return ids

    async def _stream(
        self, request: CompletionRequest, prompts: list[list[int]], jobs: list[Job], stream: Chunks, request_id: str
    ) -> AsyncIterator[CompletionResponse]:
        ctx, k = self.ctx, request.logprobs_k
        offsets = {job.index: 0 for job in jobs}
        completion_tokens = 0
        async for index, piece in stream:
            completion_tokens += len(piece.token_ids)
            if not (piece.text or piece.finish_reason or (k is not None and piece.token_ids)):
                continue
            logprobs = None
            if k is not None:
                logprobs = completion_logprobs(
                    piece.token_ids, piece.logprobs or [], k, ctx.renderer.token_text, offsets[index]
                )
            offsets[index] += len(piece.text)
            choice = CompletionChoice(index=index, text=piece.text, logprobs=logprobs, finish_reason=piece.finish_reason)
            yield CompletionResponse(id=request_id, model=ctx.model_name, choices=[choice])
        if request.stream_options and request.stream_options.include_usage:
            yield CompletionResponse(
                id=request_id, model=ctx.model_name, choices=[], usage=usage(prompts, completion_tokens)
            )
