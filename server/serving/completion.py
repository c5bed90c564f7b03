"""POST /v1/completions."""

from __future__ import annotations

import asyncio

from server.engines import EngineChunk, LoraAdapter
from server.errors import InvalidRequestError
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from server.serving.generation import Choice, usage
from server.serving.handler import EndpointHandler
from server.serving.logprobs import completion_logprobs, echo_logprobs, joined, prompt_logprobs


class CompletionHandler(EndpointHandler[CompletionRequest]):
    id_prefix = "cmpl"

    def prompts(self, request: CompletionRequest) -> list[list[int]]:
        """A string, a token-id list, or a batch of either."""
        renderer = self.ctx.renderer
        ids = [renderer.text(p) if isinstance(p, str) else renderer.check_ids(p) for p in _batch(request.prompt)]
        if any(not p for p in ids):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return ids

    async def score_prompts(self, request: CompletionRequest, prompts: list[list[int]], request_id: str,
                            adapter: LoraAdapter | None = None) -> list[list[dict[int, float]]] | None:
        k = request.prompt_k
        if k is None:
            return None
        self.ctx.validator.check_prompt_logprobs(request)
        engine = self.ctx.engine
        return list(await asyncio.gather(*(
            engine.prompt_logprobs(ids, k, f"{request_id}-prompt-{p}", adapter) for p, ids in enumerate(prompts))))

    def response(
        self, request: CompletionRequest, prompts: list[list[int]], choices: list[Choice], request_id: str
    ) -> CompletionResponse:
        return CompletionResponse(
            id=request_id,
            model=request.model,  # the base's served name, or the adapter's
            choices=[self._choice(request, prompts, c) for c in choices],
            usage=usage(prompts, sum(len(c.token_ids) for c in choices)),
        )

    def _choice(self, request: CompletionRequest, prompts: list[list[int]], c: Choice) -> CompletionChoice:
        k, token_text = request.logprobs_k, self.token_text(request)
        prompt_ids = prompts[c.index // request.n]
        text, logprobs = c.text, None
        if k is not None:
            logprobs = completion_logprobs(c.token_ids, c.logprobs, k, token_text)
        if request.echo:
            text = self._prompt_text(request, c.index // request.n, prompt_ids) + text
            if logprobs is not None:
                logprobs = joined(echo_logprobs(prompt_ids, c.prompt_logprobs, k, token_text), logprobs)
        scored = None
        if request.prompt_logprobs is not None:
            scored = prompt_logprobs(prompt_ids, c.prompt_logprobs, request.prompt_logprobs, token_text)
        return CompletionChoice(index=c.index, text=text, logprobs=logprobs, finish_reason=c.finish_reason,
                                prompt_logprobs=scored)

    def _prompt_text(self, request: CompletionRequest, p: int, prompt_ids: list[int]) -> str:
        """The prompt as the client sent it (token-id prompts decoded), as vLLM echoes it."""
        prompt = _batch(request.prompt)[p]
        return prompt if isinstance(prompt, str) else self.ctx.renderer.tokenizer.decode(prompt_ids)

    def chunk(
        self, request: CompletionRequest, index: int, piece: EngineChunk, request_id: str, offset: int
    ) -> CompletionResponse:
        k = request.logprobs_k
        logprobs = None
        if k is not None:
            logprobs = completion_logprobs(piece.token_ids, piece.logprobs or [], k, self.token_text(request), offset)
        choice = CompletionChoice(index=index, text=piece.text, logprobs=logprobs, finish_reason=piece.finish_reason)
        return CompletionResponse(id=request_id, model=request.model, choices=[choice])

    def usage_chunk(self, request: CompletionRequest, request_id: str, totals: Usage) -> CompletionResponse:
        return CompletionResponse(id=request_id, model=request.model, choices=[], usage=totals)


def _batch(prompt: str | list) -> list:
    """A string, a token-id list, or a batch of either, as a batch."""
    return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
