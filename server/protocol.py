"""OpenAI wire models: what clients send and what they get back.

Validation lives here (ranges, types, unsupported features), so handlers receive only
well-formed requests; limits that depend on settings (n, logprobs, lengths) are the
request validator's (server/serving/validation.py). Unknown fields are ignored, like
vLLM; fields that would change the meaning of a request and that we do not implement
(tools, logit_bias, ...) are refused, and documented in the schema as what passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FinishReason = Literal["stop", "length"]

# Fields that change what a request means; silently ignoring them would return wrong answers.
_UNSUPPORTED = (
    "tools", "functions", "tool_choice", "function_call", "response_format", "logit_bias",
    "audio", "modalities", "prediction", "suffix", "best_of",
)


# vLLM's request extensions this server does not implement, with the value that means
# "off" (vLLM's default; null is off too). Anything else is refused with a 400, never
# silently dropped: a client relying on it would get a different answer than from vLLM.
_VLLM_OFF: dict[str, Any] = {
    "use_beam_search": False, "length_penalty": 1.0, "stop_token_ids": [], "include_stop_str_in_output": False,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "truncate_prompt_tokens": None,
    "truncation_side": None, "logprob_token_ids": None, "allowed_token_ids": None, "bad_words": [],
    "add_generation_prompt": True, "continue_final_message": False, "documents": None, "chat_template": None,
    "chat_template_kwargs": None, "media_io_kwargs": None, "mm_processor_kwargs": None, "structured_outputs": None,
    "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None, "priority": 0,
    "return_token_ids": None, "return_token_offsets": False, "return_prompt_text": None, "return_mm_kwargs": None,
    "cache_salt": None, "kv_transfer_params": None, "ec_transfer_params": None, "vllm_xargs": None,
    "repetition_detection": None, "thinking_token_budget": None, "reasoning_effort": None, "include_reasoning": True,
    "parallel_tool_calls": True, "echo": False, "prompt_logprobs": None, "prompt_embeds": None, "watermarking": None,
    "logits_processors": None, "routed_experts_prompt_start": 0,
}


def _is_off(name: str, value: Any) -> bool:
    """Null, or the off value itself: a number for a number (1 for 1.0), a boolean for a
    boolean; `true` is not the length penalty 1.0, nor `false` the priority 0 (Python's
    True == 1 would let either through: the schema's fuzzer found `"length_penalty": true`)."""
    off = _VLLM_OFF[name]
    if value is None:
        return True
    return isinstance(value, bool) == isinstance(off, bool) and value == off


# What passes of each refused OpenAI field (`_is_default`), as its documented schema.
_EMPTY_ONLY = {"anyOf": [{"enum": [False, [], {}, ""]}, {"type": "null"}]}
_UNSUPPORTED_ACCEPTED: dict[str, tuple[dict, str]] = {
    "best_of": ({"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
                "only null or the value of `n` (one sample per choice) is accepted"),
    "tool_choice": ({"anyOf": [{"const": "none"}, {"type": "null"}]}, 'only "none" (or null) is accepted'),
    "response_format": ({"anyOf": [{"const": {"type": "text"}}, {"type": "null"}]},
                        'only {"type": "text"} (or null) is accepted'),
}


def _document_refused(schema: dict) -> None:
    """What a request type refuses, documented as what passes (anything else is a 400
    naming the field), so /openapi.json tells the truth: OpenAI's fields this server does
    not implement (`_UNSUPPORTED`: null or their default), and vLLM's extensions it does not
    implement (their off value or null)."""
    schema["description"] = (
        "OpenAI's " + ", ".join(f"`{name}`" for name in _UNSUPPORTED) + " are not supported: each is refused "
        "(400) unless absent, null or at its default, as its property says; so are vLLM's extensions this "
        "server does not implement, unless at their off value. Other unknown fields are ignored.")
    for name in _UNSUPPORTED:
        accepted, which = _UNSUPPORTED_ACCEPTED.get(name, (_EMPTY_ONLY, "only null, false or an empty value is accepted"))
        schema["properties"][name] = {**accepted, "description": f"OpenAI field not supported here: {which}"}
    for name, off in _VLLM_OFF.items():
        # Plain `null` where null is the off value: schemathesis (4.32) reads `{"const": null}`
        # as no constraint at all and generates anything for it.
        accepted = {"type": "null"} if off is None else {"anyOf": [{"const": off}, {"type": "null"}]}
        schema["properties"].setdefault(name, {
            **accepted, "description": "vLLM extension not supported here: only its off value (or null) is accepted",
        })


# The largest count an engine takes: vLLM sends its requests to the engine core as msgpack
# and samples with int32 kernels, so a larger top_k was a 500 (OverflowError), not a 400.
ENGINE_INT_MAX = 2**31 - 1


def _is_default(name: str, value: Any, n: int) -> bool:
    if name == "best_of":  # a number, as `n` is: `true` is not 1 (Python's True == 1 would let it through)
        return value is None or (not isinstance(value, bool) and value == n)
    if name == "tool_choice":
        return value is None or value == "none"
    if name == "response_format":
        return value is None or value == {"type": "text"}
    return value is None or value is False or value in ([], {}, "")


def _replace(schema: dict) -> Callable[[dict], None]:
    """A field's documented schema, where the validators accept more or less than its
    annotation says (so /openapi.json tells clients what really passes)."""

    def apply(target: dict) -> None:
        target.clear()
        target.update(schema)

    return apply


_NON_EMPTY = {"type": "string", "minLength": 1}
_STOP_SCHEMA = _replace({"anyOf": [_NON_EMPTY, {"type": "array", "items": _NON_EMPTY, "maxItems": 16}, {"type": "null"}]})
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT_SCHEMA = _replace({"anyOf": [
    _NON_EMPTY, _TOKEN_IDS, {"type": "array", "items": _NON_EMPTY, "minItems": 1},
    {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
]})


def _text_part_schema(schema: dict) -> None:
    schema["properties"]["type"] = {"type": "string", "enum": ["text"]}
    schema["properties"]["text"] = {"type": "string"}
    schema["required"] = ["type", "text"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Request(BaseModel):
    # strict: JSON carries exact types, so `"n": true` or `"temperature": "0.5"` are errors.
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=_document_refused)

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stop: list[str] = Field(default_factory=list, json_schema_extra=_STOP_SCHEMA)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's sampling extensions, with its semantics (its benchmark client sends ignore_eos).
    ignore_eos: bool = Field(default=False, description="vLLM: generate past end-of-sequence")
    min_tokens: int = Field(default=0, ge=0, le=ENGINE_INT_MAX,
                            description="vLLM: no end-of-sequence or stop string before this many")
    top_k: int | None = Field(default=None, ge=-1, le=ENGINE_INT_MAX,
                              description="vLLM: sample among the k likeliest (0 or -1: all)")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0,
                                description="vLLM: drop tokens below min_p x the likeliest token's probability")
    # vLLM takes any positive value; past these bounds float32 logits overflow (inf, then NaN).
    repetition_penalty: float | None = Field(
        default=None, ge=0.01, le=100.0, description="vLLM: >1 discourages tokens already in the prompt or output")
    return_tokens_as_token_ids: bool | None = Field(
        default=None, description="vLLM: log-prob tokens as 'token_id:N' (for tokens that are not valid text)")

    @field_validator("n", "seed", "max_tokens", "max_completion_tokens", "top_logprobs", "logprobs", "min_tokens",
                     "top_k", "prompt_logprobs",
                     mode="before", check_fields=False)
    @classmethod
    def _integral_float(cls, value: object) -> object:
        """JSON (and JSON Schema) has one number type: `2.0` is the integer 2. Booleans and
        strings stay errors (strict), and so does `2.5`."""
        return int(value) if type(value) is float and value.is_integer() else value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else [] if value is None else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stops: list[str]) -> list[str]:
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        return stops

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Request:
        for name, value in (self.model_extra or {}).items():
            if name in _UNSUPPORTED and not _is_default(name, value, self.n):
                raise ValueError(f"'{name}' is not supported by this server")
            if name in _VLLM_OFF and not _is_off(name, value):
                raise ValueError(f"'{name}' (a vLLM extension) is not supported by this server; "
                                 f"leave it out or send {_VLLM_OFF[name]!r}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, json_schema_extra=_text_part_schema)

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> TextPart:
        if self.type != "text" or self.text is None:
            raise ValueError(f"only text content parts are supported (got type '{self.type}')")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        """Top alternatives per token the client asked for; None = no log-probs at all."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(json_schema_extra=_PROMPT_SCHEMA)
    max_tokens: int = Field(default=16, ge=0, description="0: score the prompt only (with echo or prompt_logprobs)")
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = Field(default=False, description="the prompt before the completion (and its log-probs, with "
                       "logprobs; the first token has none)")
    prompt_logprobs: int | None = Field(
        default=None, ge=0, description="vLLM: the top-k log-probs at every prompt position (teacher-forced)")

    @model_validator(mode="after")
    def _prompt_scoring(self) -> CompletionRequest:
        if self.max_tokens == 0 and not (self.echo or self.prompt_logprobs is not None):
            raise ValueError("max_tokens 0 generates nothing: it scores the prompt, with echo or prompt_logprobs")
        if self.stream and (self.echo or self.prompt_logprobs is not None):
            raise ValueError("echo and prompt_logprobs are not supported with stream")
        return self

    @property
    def prompt_k(self) -> int | None:
        """Log-probs needed over the prompt: for prompt_logprobs, and for echo with logprobs."""
        wanted = [k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None]
        return max(wanted) if wanted else None

    @field_validator("prompt", mode="before")
    @classmethod
    def _integral_ids(cls, value: Any) -> Any:
        """Token ids written as `2.0` are ids too (one JSON number type, as for `n`)."""
        def whole(item: Any) -> Any:
            return int(item) if type(item) is float and item.is_integer() else item

        if isinstance(value, list):
            return [[whole(i) for i in p] if isinstance(p, list) else whole(p) for p in value]
        return value

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    @property
    def completion_limit(self) -> int:
        return self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs


# --- responses ---------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]
    # OpenAI's schema requires the key; we never refuse, so it is always null.
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    # Required by OpenAI's schema (ChatCompletionResponseMessage); always null here.
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    # null for an echoed prompt's first token (nothing predicts it), as OpenAI and vLLM send.
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry. `rank` is 1-based among the top-k; null for the
    prompt's own token when it is outside them."""

    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    # vLLM's: per prompt position, {token id: entry}; the first position is null. Only when asked.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(
        default=None, exclude_if=lambda value: value is None)


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    # Streamed chunks share this shape; OpenAI's schema has no null usage here (unlike
    # the chat chunk's), so the key is left out rather than sent as null.
    usage: Usage | None = Field(default=None, exclude_if=lambda usage: usage is None)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "shadowserve"
    max_model_len: int
    # vLLM's: a mounted LoRA adapter's directory, and the base it is mounted on.
    root: str | None = Field(default=None, exclude_if=lambda value: value is None)
    parent: str | None = Field(default=None, exclude_if=lambda value: value is None)


# --- vLLM's runtime LoRA routes ---------------------------------------------------


class LoadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False
    # shadowserve's: the reference's own copy of the adapter (default: lora_path).
    reference_path: str | None = None


class UnloadLoraAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- vLLM's /tokenize and /detokenize ----------------------------------------------


class TokenizeRequest(BaseModel):
    """A completions `prompt`, or chat `messages` rendered by the model's chat template."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    # vLLM's defaults: a prompt gets the tokenizer's special tokens, messages only the template's.
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        if self.messages is not None and self.add_special_tokens:
            raise ValueError("add_special_tokens with messages is not supported (the chat template places them)")
        for name in ("continue_final_message", "chat_template", "chat_template_kwargs", "tools"):
            if (self.model_extra or {}).get(name) not in (None, False, [], {}):
                raise ValueError(f"'{name}' is not supported by this server")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    tokens: list[int]

    @field_validator("tokens", mode="before")
    @classmethod
    def _integral_ids(cls, value: Any) -> Any:
        return [int(v) if type(v) is float and v.is_integer() else v for v in value] if isinstance(value, list) else value


class DetokenizeResponse(BaseModel):
    prompt: str
