"""Every request limit, in one place (TGI's router `Validation` is the model).

`RequestValidator` holds the serving limits from the settings, and its methods are the
checks the routes call: chat and completions (`check_request` before anything costs,
`check_choices` and `completion_budget` once tokenized, `fit_budget` over the jobs,
`check_prompt_logprobs` before prompt scoring), /tokenize (`check_tokenize`) and
/detokenize (`check_detokenize`). The request body's size is the middleware's
(server/body_limit.py, from `max_request_bytes`), and the OpenAPI description reads the
same limits (server/openapi.py). `ScoringValidator` is `shadowserve reference`'s.

Every refusal is in OpenAI's error shape (400; 413 for the reference's caps) with its
`param`, and names the limit's flag and both numbers, so a client knows what to change
and an operator what to raise. Text that cannot be encoded (lone UTF-16 surrogates that
JSON's `\\ud800` escapes let in) is refused here too, naming the field.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

from pydantic import BaseModel

from server.engines.base import SamplingOptions
from server.errors import ContextLengthError, InvalidRequestError, PayloadTooLargeError
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.settings import (
    MAX_LOGPROBS,
    MAX_MESSAGE_CHARS,
    MAX_N,
    MAX_PROMPTS,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_TOKENS,
    MAX_STOP_CHARS,
    ServeSettings,
)

if TYPE_CHECKING:
    from shadow.scoring import ScoreItem


class Planned(Protocol):
    """What the request budget reads of a planned job (server/serving/generation.Job)."""

    options: SamplingOptions


class ScoringCaps(Protocol):
    """What ScoringValidator reads of `shadowserve reference`'s settings (server/reference_app.ReferenceSettings)."""

    max_item_tokens: int
    max_request_tokens: int
    max_body_bytes: int


JobT = TypeVar("JobT", bound=Planned)

# `shadowserve reference`'s defaults (its flags' and ScoringValidator's).
MAX_ITEM_TOKENS = 8192
MAX_SCORE_TOKENS = 32768
MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class RequestValidator:
    """`serve`'s limits. Defaults: the settings' (docs/limits-and-security.md, "Request
    limits", says why each is what it is). The context length is the engine's, passed to
    the checks that need it."""

    max_message_chars: int = MAX_MESSAGE_CHARS
    max_prompts: int = MAX_PROMPTS
    max_stop_chars: int = MAX_STOP_CHARS
    max_request_tokens: int = MAX_REQUEST_TOKENS
    max_n: int = MAX_N
    max_logprobs: int = MAX_LOGPROBS
    max_request_bytes: int = MAX_REQUEST_BYTES

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> RequestValidator:
        return cls(max_message_chars=settings.max_message_chars, max_prompts=settings.max_prompts,
                   max_stop_chars=settings.max_stop_chars, max_request_tokens=settings.max_request_tokens,
                   max_n=settings.max_n, max_logprobs=settings.max_logprobs,
                   max_request_bytes=settings.max_request_bytes)

    # --- chat and completions ---------------------------------------------------------

    def check_request(self, request: ChatCompletionRequest | CompletionRequest) -> None:
        """Cheap checks on the parsed request, before it costs anything (no tokenization)."""
        check_encodable(request)
        if isinstance(request, ChatCompletionRequest):
            for i, message in enumerate(request.messages):
                self.check_chars(message.text(), f"messages.{i}.content")
        else:
            batch = request.prompt if isinstance(request.prompt, list) and not _is_ids(request.prompt) else [request.prompt]
            if len(batch) > self.max_prompts:
                raise InvalidRequestError(
                    f"prompt: {len(batch)} prompts in one request; the limit is {self.max_prompts} "
                    "(--max-prompts)", param="prompt")
            for i, prompt in enumerate(batch):
                if isinstance(prompt, str):
                    self.check_chars(prompt, "prompt" if len(batch) == 1 else f"prompt.{i}")
        for i, stop in enumerate(request.stop):
            if len(stop) > self.max_stop_chars:
                raise InvalidRequestError(
                    f"stop.{i}: a stop sequence of {len(stop)} characters; the limit is {self.max_stop_chars} "
                    "(--max-stop-chars)", param="stop")

    def check_choices(self, request: ChatCompletionRequest | CompletionRequest) -> None:
        """`n`, and the log-probs per generated token (top_logprobs / logprobs)."""
        if request.n > self.max_n:
            raise InvalidRequestError(f"n: {request.n} choices; the limit is {self.max_n} (--max-n)", param="n")
        k = request.logprobs_k
        if k is not None and k > self.max_logprobs:
            param = "top_logprobs" if isinstance(request, ChatCompletionRequest) else "logprobs"
            raise InvalidRequestError(
                f"{param}: {k} log-probs per token; the limit is {self.max_logprobs} (--max-logprobs)", param=param)

    def check_prompt_logprobs(self, request: CompletionRequest) -> None:
        """The log-probs per prompt token a completions request scores (prompt_logprobs, or echo with logprobs)."""
        k = request.prompt_k
        if k is not None and k > self.max_logprobs:
            param = "prompt_logprobs" if request.prompt_logprobs == k else "logprobs"
            raise InvalidRequestError(
                f"{param}: {k} log-probs per prompt token; the limit is {self.max_logprobs} (--max-logprobs)",
                param=param)

    @staticmethod
    def completion_budget(prompt_len: int, asked: int | None, max_model_len: int, prompt_param: str) -> int:
        """The tokens one prompt may generate within the context: the client's max_tokens,
        or all the room left (OpenAI's `context_length_exceeded` past it)."""
        if prompt_len >= max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {max_model_len} tokens (--max-model-len). However, your "
                f"prompt has {prompt_len} tokens, which leaves no room for a completion. Please shorten it.",
                param=prompt_param,
            )
        room = max_model_len - prompt_len
        if asked is not None and asked > room:
            raise ContextLengthError(
                f"This model's maximum context length is {max_model_len} tokens (--max-model-len). However, you "
                f"requested {prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} for the completion). "
                "Please reduce the prompt or the completion length.",
                param="max_tokens",
            )
        return asked if asked is not None else room

    def fit_budget(self, jobs: list[JobT], *, explicit: bool, n: int, prompts: int) -> list[JobT]:
        """The tokens a request may generate, summed over its jobs, within the budget: a
        client's own max_tokens past it is refused; the context's room (no max_tokens
        sent) is shared out instead, so a long-context model still answers plain requests."""
        generated = sum(job.options.max_tokens for job in jobs)
        if generated <= self.max_request_tokens:
            return jobs
        if explicit:
            raise InvalidRequestError(
                f"this request may generate {generated} tokens ({prompts} prompt(s) x n={n} x max_tokens); "
                f"the limit is {self.max_request_tokens} (--max-request-tokens): lower n or max_tokens",
                param="max_tokens")
        share = max(1, self.max_request_tokens // len(jobs))
        return [replace(job, options=replace(job.options, max_tokens=min(job.options.max_tokens, share))) for job in jobs]

    # --- /tokenize and /detokenize ----------------------------------------------------

    def check_tokenize(self, request: TokenizeRequest) -> None:
        """The same character limit as the completion routes' (encodability: `check_encodable`)."""
        if request.messages is not None:
            for i, message in enumerate(request.messages):
                self.check_chars(message.text(), f"messages.{i}.content")
        elif request.prompt is not None:
            self.check_chars(request.prompt, "prompt")

    @staticmethod
    def check_detokenize(request: DetokenizeRequest, max_model_len: int) -> None:
        """A token count is capped by the context it could come from, not by a character limit."""
        if len(request.tokens) > max_model_len:
            raise InvalidRequestError(
                f"tokens: {len(request.tokens)} ids; the limit is the model's context, {max_model_len} tokens "
                "(--max-model-len)", param="tokens")

    def check_chars(self, text: str, param: str) -> None:
        if len(text) > self.max_message_chars:
            raise InvalidRequestError(
                f"{param}: {len(text)} characters; the limit is {self.max_message_chars} (--max-message-chars)",
                param=param)


@dataclass(frozen=True)
class ScoringValidator:
    """`shadowserve reference`'s limits on a score request: 413 past a cap (one item's
    tokens, the batch padded to its longest, the body's bytes: the middleware's), 400 for
    an id outside the vocabulary."""

    max_item_tokens: int = MAX_ITEM_TOKENS
    max_request_tokens: int = MAX_SCORE_TOKENS
    max_body_bytes: int = MAX_BODY_BYTES

    @classmethod
    def from_settings(cls, settings: ScoringCaps) -> ScoringValidator:
        return cls(settings.max_item_tokens, settings.max_request_tokens, settings.max_body_bytes)

    def check_items(self, items: list[ScoreItem], vocab_size: int) -> None:
        sizes = [len(item.prompt_ids) + len(item.output_ids) for item in items]
        for n, size in enumerate(sizes):
            if size > self.max_item_tokens:
                raise PayloadTooLargeError(
                    f"items.{n}: {size} prompt + output tokens is over --max-item-tokens {self.max_item_tokens}",
                    param=f"items.{n}",
                )
        # The batch is padded to its longest item: that, not the sum, is what a forward costs.
        padded = len(sizes) * max(sizes, default=0)
        if padded > self.max_request_tokens:
            raise PayloadTooLargeError(
                f"{len(items)} items padded to the longest ({max(sizes)} tokens) make {padded} tokens, over "
                f"--max-request-tokens {self.max_request_tokens}",
                param="items",
            )
        for n, item in enumerate(items):
            ids = [*item.prompt_ids, *item.output_ids, *(t for pos in item.candidate_ids for t in pos)]
            if any(not 0 <= t < vocab_size for t in ids):
                raise InvalidRequestError(f"items.{n}: token id outside the vocabulary", param=f"items.{n}")


def _is_ids(prompt: list) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


def check_encodable(request: BaseModel) -> None:
    """Lone surrogates parse from JSON but are not text: no tokenizer can encode them."""
    for path, text in _strings(request, ()):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            param = ".".join(map(str, path))
            raise InvalidRequestError(
                f"{param}: character {exc.start} is a lone UTF-16 surrogate (U+{ord(text[exc.start]):04X}), "
                "which is not valid Unicode text; surrogates must come in high-low pairs", param=param,
            ) from None


def _strings(value: object, path: tuple) -> Iterator[tuple[tuple, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, BaseModel):  # declared fields only: extra fields are ignored, never echoed
        for name in type(value).model_fields:
            yield from _strings(getattr(value, name), (*path, name))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _strings(item, (*path, i))
