"""Per-request limits from the settings, checked before any tokenization, and text that
cannot be encoded (lone UTF-16 surrogates that JSON's `\\ud800` escapes let in).

Every refusal is a 400 in OpenAI's shape that names the limit's flag and both numbers,
so a client knows what to change and an operator what to raise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pydantic import BaseModel

from server.errors import InvalidRequestError
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.settings import MAX_MESSAGE_CHARS, MAX_PROMPTS, MAX_REQUEST_TOKENS, MAX_STOP_CHARS, ServeSettings

if TYPE_CHECKING:  # for annotations only: generation would load the engines with this module
    from server.serving.generation import Job


@dataclass(frozen=True)
class RequestLimits:
    """Defaults: the settings' (docs/limits-and-security.md, "Request limits", says why each is what it is)."""

    max_message_chars: int = MAX_MESSAGE_CHARS
    max_prompts: int = MAX_PROMPTS
    max_stop_chars: int = MAX_STOP_CHARS
    max_request_tokens: int = MAX_REQUEST_TOKENS

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> RequestLimits:
        return cls(settings.max_message_chars, settings.max_prompts, settings.max_stop_chars,
                   settings.max_request_tokens)

    def check(self, request: ChatCompletionRequest | CompletionRequest) -> None:
        """Cheap checks on the parsed request, before it costs anything."""
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

    def fit_budget(self, jobs: list[Job], *, explicit: bool, n: int, prompts: int) -> list[Job]:
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

    def check_chars(self, text: str, param: str) -> None:
        if len(text) > self.max_message_chars:
            raise InvalidRequestError(
                f"{param}: {len(text)} characters; the limit is {self.max_message_chars} (--max-message-chars)",
                param=param)


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
