"""The engine protocol: prompt token ids in, a stream of token chunks out.

Engines know nothing of HTTP or shadow. Log-probs are the model's *raw* distribution
(before temperature, top-p and penalties), so a shadow comparison sees what the model
computed, not what the sampler did with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]


class EngineInputError(ValueError):
    """The engine refused a request's parameters (a client error, not a server fault)."""


class EngineDeadError(RuntimeError):
    """The engine can serve nothing more (its process died): the server must go."""


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Raw top-k log-probs per generated token: None = none, 0 = the emitted token only.
    logprobs: int | None = None
    ignore_eos: bool = False  # vLLM's extension: only max_tokens and stop strings end it
    # vLLM's sampling extensions, with its semantics: no EOS or stop string before
    # min_tokens; top_k 0 = all; min_p relative to the likeliest token; repetition_penalty
    # over prompt and output tokens (positive logits divided, negative multiplied).
    min_tokens: int = 0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class EngineChunk:
    """Tokens generated since the previous chunk of one sequence."""

    token_ids: list[int]
    text: str
    # One {token_id: raw logprob} per entry of token_ids: the top-k plus the emitted token.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class LoraAdapter:
    """A mounted LoRA adapter, as a request names it (`model`) and the engine knows it."""

    name: str
    path: Path
    id: int  # the engine's id for this load (vLLM's lora_int_id): unique, never reused


class Engine(Protocol):
    name: str
    max_model_len: int
    dtype: str  # the dtype the model really runs in ("bfloat16", ...), `auto` resolved

    def generate(
        self, prompt_ids: list[int], options: SamplingOptions, request_id: str, adapter: LoraAdapter | None = None
    ) -> AsyncIterator[EngineChunk]:
        """Stream one sequence, on the base or with a mounted adapter. Closing the
        iterator early aborts the request."""
        ...

    async def prompt_logprobs(self, prompt_ids: list[int], k: int, request_id: str,
                              adapter: LoraAdapter | None = None) -> list[dict[int, float]]:
        """Teacher-forced over the prompt: for each position 1..n-1, the raw top-k
        log-probs plus the prompt's own token there (llama.cpp's perplexity mode)."""
        ...

    async def add_adapter(self, adapter: LoraAdapter) -> None:
        """Load a LoRA adapter so requests can name it; raise EngineInputError if the
        engine refuses it."""
        ...

    def pending(self) -> int:
        """Requests the engine holds now, running or waiting (vLLM's own count): the
        shadow's reference runs free only while this is 0. Cheap: read often."""
        ...

    async def check_health(self) -> None:
        """Return when the engine can serve; raise EngineDeadError when it never will again."""
        ...

    async def shutdown(self) -> None: ...
