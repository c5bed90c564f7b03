"""Capacity plan for serving a model with vLLM on a device type (extends `inspect`): the
weights each device holds at a tensor-parallel degree, the KV cache left (tokens, and
sequences at full context), where the fp32 reference goes, and the decode speed that
memory bandwidth allows (every weight is read once per decode step).

The arithmetic follows vLLM's own: the KV cache gets `memory x gpu_memory_utilization`
less the weights and a working reserve (activations, CUDA graphs, the CUDA context),
rounded down to whole blocks; KV heads split across tensor ranks (replicated when the
degree exceeds them). The reserve is an estimate (vLLM measures it by profiling at
start); the rest is exact for dense decoder-only models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapters.errors import AdapterError
from adapters.inspect_model import BYTES, GIB, parameter_count


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float  # what the driver reports as usable
    bandwidth_gbs: float  # datasheet peak, GB/s (1e9 bytes)
    block_size: int = 16  # vLLM's default KV block size on GPUs


# Usable memory as nvidia-smi reports it; peak bandwidth from the vendors' datasheets.
DEVICES = {
    d.name: d for d in (
        Device("h200-141gb", 139.8, 4800), Device("h100-80gb", 79.6, 3350), Device("h100-pcie-80gb", 79.6, 2000),
        Device("a100-80gb", 79.2, 2039), Device("a100-40gb", 39.4, 1555), Device("l40s-48gb", 44.4, 864),
        Device("a10-24gb", 22.1, 600), Device("l4-24gb", 22.0, 300), Device("rtx4090-24gb", 23.6, 1008),
    )
}


class PlanError(AdapterError):
    """The model cannot be planned as asked (an unknown device, a degree the heads refuse)."""


@dataclass(frozen=True)
class Plan:
    device: Device
    tensor_parallel: int
    dtype: str
    kv_dtype: str
    gpu_memory_utilization: float
    reserve_gib: float
    parameters: int
    max_context: int
    weights_per_device: float  # bytes
    kv_bytes_per_token_per_device: int
    kv_tokens: int  # whole blocks; 0 when the weights do not fit
    reference_bytes: float  # fp32 weights + the logits of one shadow batch
    reference_devices: int  # 0: fits beside the candidate in the memory vLLM leaves
    decode_tokens_per_s: float  # upper bound, batch 1, from bandwidth
    smallest_fitting_degree: int | None  # the least tensor-parallel degree whose KV cache holds one full context

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.device.block_size

    @property
    def sequences_at_max_context(self) -> int:
        return self.kv_tokens // self.max_context if self.max_context else 0


def kv_heads_per_rank(kv_heads: int, tensor_parallel: int) -> int:
    """vLLM splits KV heads across ranks, and replicates them when the degree exceeds them."""
    return max(1, kv_heads // tensor_parallel)


def valid_degree(heads: int, kv_heads: int, tensor_parallel: int) -> bool:
    """What vLLM accepts: query heads divide by the degree; KV heads divide by it or it by them."""
    return heads % tensor_parallel == 0 and (kv_heads % tensor_parallel == 0 or tensor_parallel % kv_heads == 0)


def plan(config: dict, device: Device, tensor_parallel: int = 1, dtype: str = "bf16", kv_dtype: str | None = None,
         gpu_memory_utilization: float = 0.9, reserve_gib: float = 1.5, shadow_batch_tokens: int = 2048,
         kv_cache_gib: float | None = None) -> Plan:
    """`kv_cache_gib` fixes the KV cache's size (serve's --kv-cache-gib) instead of what is left."""
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if not valid_degree(heads, kv_heads, tensor_parallel):
        raise PlanError(f"tensor-parallel degree {tensor_parallel} does not split {heads} attention heads and "
                        f"{kv_heads} KV heads; vLLM would refuse it")
    kv_dtype = kv_dtype or dtype
    params = parameter_count(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    max_context = config.get("max_position_embeddings", 0)

    def per_device(tp: int) -> tuple[float, int, int]:
        weights = params * BYTES[dtype] / tp
        kv_per_token = int(2 * config["num_hidden_layers"] * kv_heads_per_rank(kv_heads, tp) * head_dim * BYTES[kv_dtype])
        left = device.memory_gib * GIB * gpu_memory_utilization - weights - reserve_gib * GIB
        kv_bytes = left if kv_cache_gib is None else min(kv_cache_gib * GIB, left)
        blocks = max(0, math.floor(kv_bytes / (kv_per_token * device.block_size)))
        return weights, kv_per_token, blocks * device.block_size

    weights, kv_per_token, kv_tokens = per_device(tensor_parallel)
    fitting = [tp for tp in range(1, heads + 1)
               if valid_degree(heads, kv_heads, tp) and per_device(tp)[2] >= max(max_context, device.block_size)]
    # The reference: fp32 weights, plus one shadow batch's fp32 logits and their log-softmax.
    reference = params * 4 + 2 * shadow_batch_tokens * config["vocab_size"] * 4
    left_beside = tensor_parallel * device.memory_gib * GIB * (1 - gpu_memory_utilization)
    own = 0 if reference <= left_beside else math.ceil(reference / (device.memory_gib * GIB * 0.95))
    return Plan(device, tensor_parallel, dtype, kv_dtype, gpu_memory_utilization, reserve_gib, params, max_context,
                weights, kv_per_token, kv_tokens, reference, own, device.bandwidth_gbs * 1e9 / weights,
                fitting[0] if fitting else None)


def render(p: Plan) -> str:
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    d = p.device
    lines = [
        f"{d.name}: {d.memory_gib:g} GiB, {d.bandwidth_gbs:g} GB/s; tensor parallel {p.tensor_parallel}; "
        f"weights {p.dtype}, KV cache {p.kv_dtype}; vLLM memory share {p.gpu_memory_utilization:g}, "
        f"reserve {p.reserve_gib:g} GiB per device (an estimate: vLLM profiles it at start)",
        "",
        "| per device | |",
        "|---|---|",
        f"| weights | {gib(p.weights_per_device)} ({p.parameters:.3g} params × {BYTES[p.dtype]:g} bytes / "
        f"{p.tensor_parallel}) |",
        f"| KV cache per token | {p.kv_bytes_per_token_per_device:,} bytes |",
    ]
    if p.fits:
        lines += [f"| KV cache | {p.kv_tokens:,} tokens; {p.sequences_at_max_context:,} sequences at the full "
                  f"{p.max_context:,}-token context |"]
    else:
        fix = (f"tensor parallel {p.smallest_fitting_degree} is the least degree that holds one full context"
               if p.smallest_fitting_degree else "no tensor-parallel degree holds one full context: a smaller dtype")
        lines += [f"| KV cache | does not fit: the weights and reserve leave no room ({fix}) |"]
    lines += [
        f"| decode upper bound | {p.decode_tokens_per_s:,.1f} tokens/s per sequence (bandwidth / weights per "
        "device: every weight read once per step) |",
        "",
        f"fp32 reference: {gib(p.reference_bytes)} (weights × 4 bytes + one shadow batch's logits): " + (
            "fits beside the candidate in the memory vLLM leaves on its devices (a device map across them)"
            if p.reference_devices == 0 else
            f"needs {p.reference_devices} device(s) of its own (`shadowserve reference`, a device map across them)"),
    ]
    return "\n".join(lines)
