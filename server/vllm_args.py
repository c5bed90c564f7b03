"""vLLM engine options: the parallel layout checked against the model's shape, and the
`--engine-arg KEY=VALUE` pass-through parsed by vLLM's own argument parser, so a typo,
a bad value or a key shadowserve sets itself is a clear start-up error, never a crash
half-way through loading or an option silently dropped."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

# Engine arguments shadowserve sets from its own settings (or must not be changed: the
# shadow compares raw log-probs, and our metrics need vLLM's stats on). Given through
# --engine-arg they would silently fight the flag: refused, naming the flag to use.
OWNED = {
    "model": "--model", "served_model_name": "--served-model-name", "dtype": "--dtype",
    "max_model_len": "--max-model-len", "max_logprobs": "--max-logprobs", "enforce_eager": "--enforce-eager",
    "gpu_memory_utilization": "--gpu-memory-utilization", "kv_cache_memory_bytes": "--kv-cache-gib",
    "seed": "--seed", "trust_remote_code": "--trust-remote-code",
    "tensor_parallel_size": "--tensor-parallel-size", "pipeline_parallel_size": "--pipeline-parallel-size",
    "distributed_executor_backend": "--distributed-executor-backend", "quantization": "--quantization",
    "max_num_seqs": "--max-num-seqs", "enable_prefix_caching": "--enable-prefix-caching",
    "enable_lora": "--enable-lora", "max_loras": "--max-loras", "max_lora_rank": "--max-lora-rank",
    "max_cpu_loras": "--max-cpu-loras",
    "lora_dtype": "(fixed: adapters run in the serving dtype, as the shadow's noise floor models them)",
    "logprobs_mode": "(fixed: the shadow compares raw log-probs)",
    "disable_log_stats": "(fixed: /metrics needs vLLM's stats)",
}

TRUE, FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class EngineArgError(ValueError):
    """An engine option vLLM would not accept, or one that cannot work for this model."""


def check_parallel(config: dict, tensor_parallel: int, pipeline_parallel: int) -> None:
    """The degrees vLLM can split this model into (`adapters.plan.valid_degree`: heads
    divide by the tensor degree, KV heads divide by it or it by them), and every
    pipeline stage holding at least one layer."""
    from adapters.plan import valid_degree

    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    layers = config.get("num_hidden_layers")
    if tensor_parallel > 1 and heads and not valid_degree(heads, kv, tensor_parallel):
        why = (f"the model's {heads} attention heads do not divide by {tensor_parallel}" if heads % tensor_parallel
               else f"the model's {kv} KV heads neither divide by {tensor_parallel} nor divide it")
        working = [d for d in range(1, heads + 1) if valid_degree(heads, kv, d)]
        raise EngineArgError(f"--tensor-parallel-size {tensor_parallel}: {why} ({heads} attention heads, {kv} KV "
                             f"heads); use a degree that splits both: {working}")
    if pipeline_parallel > 1 and layers and pipeline_parallel > layers:
        raise EngineArgError(
            f"--pipeline-parallel-size {pipeline_parallel}: the model has only {layers} layers to split")


def check_platform(pipeline_parallel: int, enforce_eager: bool, backend: str | None, platform) -> None:
    """What vLLM's platform (`vllm.platforms.current_platform`) cannot run, refused before
    anything starts:
    - Ray where the platform has no Ray device (`ray_device_key` empty, vLLM's own test):
      its CPU backend starts a Ray instance and then fails with "current platform cpu does
      not support ray." (vLLM 0.32).
    - A pipeline in eager mode on CPU: the backend allocates the buffers a later stage
      receives into only in its compile warm-up, which eager mode skips, so the first
      request kills the engine (`assert self.intermediate_tensors is not None`)."""
    if backend == "ray" and not platform.ray_device_key:
        raise EngineArgError(
            f"--distributed-executor-backend ray: vLLM's {platform.device_name} backend does not support Ray "
            "(it would start a Ray instance, then fail with 'current platform "
            f"{platform.device_name} does not support ray.'); use mp, vLLM's processes on this host")
    if platform.is_cpu() and pipeline_parallel > 1 and enforce_eager:
        raise EngineArgError(
            f"--pipeline-parallel-size {pipeline_parallel} with --enforce-eager true: vLLM's CPU backend skips the "
            "warm-up that sets up a later stage's input buffers in eager mode, and its engine dies on the first "
            "request; give --enforce-eager false (compiled, about 2 minutes more to start)")


def parse_engine_args(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs (KEY in vLLM's spelling, dashes or underscores) to typed
    `AsyncEngineArgs` fields, through vLLM's own argument parser."""
    if not pairs:
        return {}
    from vllm import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    parser = AsyncEngineArgs.add_cli_args(_raising_parser())
    argv: list[str] = []
    names: list[str] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        name = key.strip().lstrip("-").replace("-", "_")
        if not sep or not name:
            raise EngineArgError(f"--engine-arg {pair!r}: expected KEY=VALUE, e.g. block_size=32")
        if name in OWNED:
            raise EngineArgError(f"--engine-arg {key}: set by shadowserve, use {OWNED[name]}")
        if name not in fields:
            near = difflib.get_close_matches(name, sorted(fields - OWNED.keys()), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise EngineArgError(f"--engine-arg {key}: not a vLLM engine argument{hint}")
        if name in names:
            raise EngineArgError(f"--engine-arg {key}: given twice")
        option = "--" + name.replace("_", "-")
        action = parser._option_string_actions.get(option)
        if action is None:
            raise EngineArgError(f"--engine-arg {key}: vLLM takes no command-line value for it")
        if action.nargs == 0:  # a switch (--x / --no-x)
            flag = value.strip().lower()
            if flag not in TRUE | FALSE:
                raise EngineArgError(f"--engine-arg {key}={value}: expected true or false")
            argv.append(option if flag in TRUE else "--no-" + name.replace("_", "-"))
        else:
            argv.append(f"{option}={value}")
        names.append(name)
    try:
        parsed = vars(parser.parse_args(argv))
    except ValueError as exc:
        raise EngineArgError(f"--engine-arg: {exc}") from None
    return {name: parsed[name] for name in names}


def _raising_parser():
    """vLLM's own parser, raising instead of printing usage and exiting."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Raising(FlexibleArgumentParser):
        def error(self, message: str):
            raise ValueError(message)

    return Raising()
