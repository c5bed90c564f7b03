"""POST /v1/completions."""

from __future__ import annotations

from server.engines import EngineChunk
from server.errors import InvalidRequestError
from server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from server.serving.generation import Choice, usage
from server.serving.handler import EndpointHandler
from server.serving.logprobs import completion_logprobs


class CompletionHandler(EndpointHandler[CompletionRequest]):
    id_prefix = "cmpl"

    def prompts(self, request: CompletionRequest) -> list[list[int]]:
        """A string, a token-id list, or a batch of either."""
        renderer, prompt = self.ctx.renderer, request.prompt
        batch = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        ids = [renderer.text(p) if isinstance(p, str) else renderer.check_ids(p) for p in batch]
        if any(not p for p in ids):
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return ids

    def response(
        self, request: CompletionRequest, prompts: list[list[int]], choices: list[Choice], request_id: str
    ) -> CompletionResponse:
        k, token_text = request.logprobs_k, self.token_text(request)
        return CompletionResponse(
            id=request_id,
            model=self.ctx.model_name,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    logprobs=None if k is None else completion_logprobs(c.token_ids, c.logprobs, k, token_text),
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage=usage(prompts, sum(len(c.token_ids) for c in choices)),
        )

    def chunk(
        self, request: CompletionRequest, index: int, piece: EngineChunk, request_id: str, offset: int
    ) -> CompletionResponse:
        k = request.logprobs_k
        logprobs = None
        if k is not None:
            logprobs = completion_logprobs(piece.token_ids, piece.logprobs or [], k, self.token_text(request), offset)
        choice = CompletionChoice(index=index, text=piece.text, logprobs=logprobs, finish_reason=piece.finish_reason)
        return CompletionResponse(id=request_id, model=self.ctx.model_name, choices=[choice])

    def usage_chunk(self, request_id: str, totals: Usage) -> CompletionResponse:
        return CompletionResponse(id=request_id, model=self.ctx.model_name, choices=[], usage=totals)
