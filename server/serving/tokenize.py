"""vLLM's POST /tokenize and /detokenize: the served model's own tokenizer and chat
template, as the engine sees them (vLLM's `bench serve` and drift tools use them to
align prompts). Same limits (the context's validator), checks and error shapes as the completion routes."""

from __future__ import annotations

import asyncio

from server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.serving.context import ServingContext
from server.serving.validation import check_encodable


class TokenizeHandler:
    def __init__(self, ctx: ServingContext):
        self.ctx = ctx

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self._check(request)
        self.ctx.validator.check_tokenize(request)
        return await asyncio.to_thread(self._tokenize, request)

    def _tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        renderer = self.ctx.renderer
        if request.messages is not None:
            ids = renderer.chat(request.messages, add_generation_prompt=request.add_generation_prompt)
        else:
            ids = renderer.text(request.prompt, add_special_tokens=request.add_special_tokens is not False)
        strs = renderer.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.ctx.engine.max_model_len, tokens=ids, token_strs=strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check(request)
        self.ctx.validator.check_detokenize(request, self.ctx.engine.max_model_len)
        ids = self.ctx.renderer.check_ids(request.tokens, param="tokens")
        text = await asyncio.to_thread(self.ctx.renderer.tokenizer.decode, ids)
        return DetokenizeResponse(prompt=text)

    def _check(self, request) -> None:
        check_encodable(request)
        if request.model is not None:
            self.ctx.resolve(request.model)
