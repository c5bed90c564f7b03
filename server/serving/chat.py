"""POST /v1/chat/completions."""

from __future__ import annotations

from server.engines import EngineChunk
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Usage,
)
from server.serving.generation import Choice, Job, usage
from server.serving.handler import EndpointHandler
from server.serving.logprobs import chat_logprobs


class ChatHandler(EndpointHandler[ChatCompletionRequest]):
    id_prefix = "chatcmpl"

    def prompts(self, request: ChatCompletionRequest) -> list[list[int]]:
        return [self.ctx.renderer.chat(request.messages)]

    def response(
        self, request: ChatCompletionRequest, prompts: list[list[int]], choices: list[Choice], request_id: str
    ) -> ChatCompletionResponse:
        k, token_text = request.logprobs_k, self.token_text(request)
        return ChatCompletionResponse(
            id=request_id,
            model=request.model,  # the base's served name, or the adapter's
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content=c.text),
                    logprobs=None if k is None else chat_logprobs(c.token_ids, c.logprobs, k, token_text),
                    finish_reason=c.finish_reason,
                )
                for c in choices
            ],
            usage=usage(prompts, sum(len(c.token_ids) for c in choices)),
        )

    def opening(self, request: ChatCompletionRequest, jobs: list[Job], request_id: str) -> list[ChatCompletionChunk]:
        return [self._chunk(request, request_id, [ChatChunkChoice(index=job.index, delta={"role": "assistant", "content": ""})])
                for job in jobs]

    def chunk(
        self, request: ChatCompletionRequest, index: int, piece: EngineChunk, request_id: str, offset: int
    ) -> ChatCompletionChunk:
        k = request.logprobs_k
        logprobs = None
        if k is not None:
            logprobs = chat_logprobs(piece.token_ids, piece.logprobs or [], k, self.token_text(request))
        choice = ChatChunkChoice(index=index, delta={"content": piece.text}, logprobs=logprobs,
                                 finish_reason=piece.finish_reason)
        return self._chunk(request, request_id, [choice])

    def usage_chunk(self, request: ChatCompletionRequest, request_id: str, totals: Usage) -> ChatCompletionChunk:
        return self._chunk(request, request_id, [], usage=totals)

    def _chunk(self, request: ChatCompletionRequest, request_id: str, choices: list[ChatChunkChoice],
               **extra) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=request_id, model=request.model, choices=choices, **extra)
