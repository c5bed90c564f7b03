"""Fallback engine: a plain Hugging Face generate loop with a KV cache, one request at a time.

Used where vLLM cannot run, and as the fp32 ground truth in tests. Requests run
serially on one worker thread; each step checks for cancellation, so a closed stream
stops generating at the next token.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
from collections.abc import AsyncIterator, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from server.engines.base import EngineChunk, EngineDeadError, EngineInputError, LoraAdapter, SamplingOptions

# vLLM's rule: a temperature this small samples greedily (dividing by it overflows to inf).
_GREEDY_BELOW = 1e-5

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TransformersEngine:
    name = "transformers"

    def __init__(self, model, tokenizer, max_model_len: int):
        self._model = model.eval()
        self._tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.dtype = str(model.dtype).removeprefix("torch.")
        self.device = next(model.parameters()).device.type
        self._stop_ids = _eos_ids(model, tokenizer)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")
        self._closed = False
        self._pending = 0  # generate and prompt_logprobs calls in progress

    @classmethod
    def load(
        cls, model_dir: Path, dtype: str = "auto", max_model_len: int | None = None, trust_remote_code: bool = False
    ) -> TransformersEngine:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from adapters.model_dir import exact_attention
        from shadow.remote_code import remote_code_allowed, remote_code_explained

        trust = remote_code_allowed(model_dir, trust_remote_code)
        torch_dtype = _DTYPES.get(dtype, "auto")
        with remote_code_explained(model_dir, trust):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, trust_remote_code=trust,
                                                         **exact_attention(model_dir))
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
        limit = max_model_len or model.config.max_position_embeddings
        return cls(model, tokenizer, limit)

    async def generate(
        self, prompt_ids: list[int], options: SamplingOptions, request_id: str, adapter: LoraAdapter | None = None
    ) -> AsyncIterator[EngineChunk]:
        _no_adapter(adapter)
        if options.min_tokens > options.max_tokens:  # vLLM's own check and wording
            raise EngineInputError(f"min_tokens must be less than or equal to max_tokens={options.max_tokens}, "
                                   f"got {options.min_tokens}.")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        job = loop.run_in_executor(self._worker, self._run, prompt_ids, options, emit, cancelled)
        self._pending += 1
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            try:
                await asyncio.shield(asyncio.wrap_future(job)) if not job.done() else None
            finally:
                self._pending -= 1

    async def prompt_logprobs(self, prompt_ids: list[int], k: int, request_id: str,
                              adapter: LoraAdapter | None = None) -> list[dict[int, float]]:
        _no_adapter(adapter)
        loop = asyncio.get_running_loop()
        self._pending += 1
        try:
            return await loop.run_in_executor(self._worker, self._prompt_logprobs, prompt_ids, k)
        finally:
            self._pending -= 1

    async def add_adapter(self, adapter: LoraAdapter) -> None:
        _no_adapter(adapter)

    def pending(self) -> int:
        return self._pending

    async def check_health(self) -> None:
        if self._closed:  # in-process: only our own shutdown ends it
            raise EngineDeadError("the transformers engine is shut down")

    async def shutdown(self) -> None:
        self._closed = True
        self._worker.shutdown(wait=False, cancel_futures=True)

    def _prompt_logprobs(self, prompt_ids: list[int], k: int) -> list[dict[int, float]]:
        with torch.inference_mode():
            logits = self._model(input_ids=torch.tensor([prompt_ids])).logits[0, :-1].float()
            rows = torch.log_softmax(logits, dim=-1)
            return [_top_logprobs(row, token, k)[0] for row, token in zip(rows, prompt_ids[1:])]

    # --- the worker thread ------------------------------------------------------

    def _run(self, prompt_ids, options: SamplingOptions, emit, cancelled: threading.Event) -> None:
        try:
            with torch.inference_mode():
                for chunk in self._steps(prompt_ids, options, cancelled):
                    emit(chunk)
        except BaseException as exc:  # delivered to the awaiting coroutine
            emit(exc)
        finally:
            emit(None)

    def _steps(self, prompt_ids, options: SamplingOptions, cancelled: threading.Event):
        generator = torch.Generator().manual_seed(
            options.seed if options.seed is not None else random.getrandbits(63)
        )
        detok = _StopAwareText(self._tokenizer, options.stop)
        output: list[int] = []
        cache = None
        step_input = torch.tensor([prompt_ids])
        budget = min(options.max_tokens, self.max_model_len - len(prompt_ids))
        while not cancelled.is_set():
            out = self._model(input_ids=step_input, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[0, -1].float()
            raw = torch.log_softmax(logits, dim=-1)
            early = len(output) < options.min_tokens  # no end-of-sequence yet (vLLM's min_tokens)
            token = _sample(logits, prompt_ids, output, options, generator, self._stop_ids if early else ())
            output.append(token)
            top = _top_logprobs(raw, token, options.logprobs)
            if token in self._stop_ids and not options.ignore_eos:
                yield EngineChunk([token], detok.finish(), top, "stop")
                return
            text, hit_stop = detok.add(output, check_stops=len(output) > options.min_tokens)
            if hit_stop:
                yield EngineChunk([token], text, top, "stop")
                return
            if len(output) >= budget:
                yield EngineChunk([token], text + detok.finish(), top, "length")
                return
            yield EngineChunk([token], text, top)
            step_input = torch.tensor([[token]])


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _sample(logits: torch.Tensor, prompt: list[int], output: list[int], options: SamplingOptions, generator,
            banned: Iterable[int] = ()) -> int:
    """vLLM's sampler, in its order: banned ids (EOS before min_tokens), repetition, frequency
    and presence penalties, then greedy at temperature ~0, or temperature, min-p, top-k, top-p."""
    logits = logits.clone()
    banned = list(banned)
    if banned:
        logits[banned] = -math.inf
    if options.repetition_penalty != 1.0:
        seen = torch.unique(torch.tensor(prompt + output))
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / options.repetition_penalty, picked * options.repetition_penalty)
    if output and (options.presence_penalty or options.frequency_penalty):
        ids, counts = torch.unique(torch.tensor(output), return_counts=True)
        logits[ids] -= options.frequency_penalty * counts + options.presence_penalty
    if options.temperature < _GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = logits / options.temperature
    if options.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits[probs < options.min_p * probs.max()] = -math.inf
    if 0 < options.top_k < logits.numel():
        logits[logits < torch.topk(logits, options.top_k).values[-1]] = -math.inf
    probs = torch.softmax(logits, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, 0) - sorted_probs > options.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _top_logprobs(raw: torch.Tensor, token: int, k: int | None) -> list[dict[int, float]] | None:
    if k is None:
        return None
    entry = {token: float(raw[token])}
    if k > 0:
        values, ids = torch.topk(raw, k)
        entry.update(zip(ids.tolist(), values.tolist()))
    return [entry]


class _StopAwareText:
    """Incremental detokenization that truncates at stop strings and holds back text that
    could still become one (and incomplete UTF-8), so a stream never shows a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1
        self._text = ""
        self._sent = 0

    def add(self, output_ids: list[int], check_stops: bool = True) -> tuple[str, bool]:
        """`check_stops` False (before min_tokens, as vLLM): stop strings neither end nor hold text."""
        self._text = self._tokenizer.decode(output_ids, skip_special_tokens=True)
        for stop in self._stops if check_stops else ():
            at = self._text.find(stop, max(0, self._sent - len(stop)))
            if at != -1:
                self._text = self._text[:at]
                return self.finish(), True
        safe = len(self._text) - (self._hold if check_stops else 0)
        while safe > self._sent and self._text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(max(safe, self._sent)), False

    def finish(self) -> str:
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        piece, self._sent = self._text[self._sent:end], max(end, self._sent)
        return piece


def _no_adapter(adapter: LoraAdapter | None) -> None:
    if adapter is not None:  # the settings refuse LoRA flags with this engine; this is the last guard
        raise EngineInputError("the transformers engine serves the base model only: mounted LoRA adapters need vLLM")
