"""server/serving/tokenize.py: /detokenize's limit is the model's context (a token count),
not --max-message-chars (a character count), with the real tokenizer and a stand-in engine."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from server.errors import InvalidRequestError
from server.protocol import DetokenizeRequest
from server.serving.context import ServingContext
from server.serving.prompts import PromptRenderer
from server.serving.tokenize import TokenizeHandler
from server.serving.validation import RequestValidator


@pytest.fixture(scope="module")
def handler(demo_model) -> TokenizeHandler:
    ctx = ServingContext(engine=SimpleNamespace(max_model_len=64), renderer=PromptRenderer.load(demo_model, False),
                         model_name="m", validator=RequestValidator(max_n=1, max_logprobs=5, max_message_chars=10))
    return TokenizeHandler(ctx)


def test_detokenize_takes_up_to_the_context_whatever_the_character_limit(handler):
    ids = handler.ctx.renderer.text("hello " * 80, add_special_tokens=False)[:64]
    assert len(ids) == 64 > handler.ctx.validator.max_message_chars
    reply = asyncio.run(handler.detokenize(DetokenizeRequest(tokens=ids)))
    assert reply.prompt.startswith("hello hello")


def test_detokenize_past_the_context_names_the_flag(handler):
    with pytest.raises(InvalidRequestError) as refused:
        asyncio.run(handler.detokenize(DetokenizeRequest(tokens=[1] * 65)))
    assert "tokens: 65 ids; the limit is the model's context, 64 tokens (--max-model-len)" in str(refused.value)
    assert refused.value.param == "tokens"
