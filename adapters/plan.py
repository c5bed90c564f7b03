"""Capacity plan for serving a model with vLLM on a device type (extends `inspect`): the
weights each device holds at a tensor-parallel degree, the KV cache left (tokens, and
sequences at full context), where the fp32 reference goes, and the decode speed that
memory bandwidth allows (every weight is read once per decode step). Then the fp32
reference on devices of its own (docs/design.md, "Scaling the reference"): its memory per
tensor-parallel rank with the serving-dtype noise copy it also holds, the least
tensor-parallel size that fits, and the replicas a traffic and a sample rate ask for.

The arithmetic follows vLLM's own: the KV cache gets `memory x gpu_memory_utilization`
less the weights and a working reserve (activations, CUDA graphs, the CUDA context),
rounded down to whole blocks; KV heads split across tensor ranks (replicated when the
degree exceeds them). The reserve is an estimate (vLLM measures it by profiling at
start); the rest is exact for dense decoder-only models.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from adapters.errors import AdapterError
from adapters.inspect_model import BYTES, GIB, parameter_count
from adapters.tensor_parallel import dimensions, divisors, problems


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float  # what the driver reports as usable
    bandwidth_gbs: float  # datasheet peak, GB/s (1e9 bytes)
    block_size: int = 16  # vLLM's default KV block size on GPUs
    fp32_tflops: float | None = None  # fp32 on the CUDA cores, TF32 off (dense, datasheet peak)
    bf16_tflops: float | None = None  # bf16 tensor cores with fp32 accumulation, dense (no sparsity)


# Usable memory as nvidia-smi reports it; peak bandwidth, fp32 and bf16 rates from the vendors'
# datasheets: "NVIDIA H100 Tensor Core GPU" (SXM 67 / 989; PCIe 51 / 756), "NVIDIA H200 Tensor Core
# GPU" (SXM 67 / 989), "NVIDIA A100 Tensor Core GPU" (19.5 / 312), "NVIDIA L40S" (91.6 / 362),
# "NVIDIA A10 Tensor Core GPU" (31.2 / 125), "NVIDIA L4 Tensor Core GPU" (30.3 / 121), and the
# "NVIDIA Ada GPU Architecture" whitepaper for the RTX 4090 (82.6 / 165.2 with fp32 accumulation).
# The fp32 figure is the non-tensor one: TF32 (A100 156, H100 495 dense) rounds the inputs to 10
# mantissa bits, so a reference run with it is no longer fp32. Tensor-core figures are dense (the
# datasheets' "with sparsity" figures halved).
DEVICES = {
    d.name: d for d in (
        Device("h200-141gb", 139.8, 4800, 16, 67, 989), Device("h100-80gb", 79.6, 3350, 16, 67, 989),
        Device("h100-pcie-80gb", 79.6, 2000, 16, 51, 756), Device("a100-80gb", 79.2, 2039, 16, 19.5, 312),
        Device("a100-40gb", 39.4, 1555, 16, 19.5, 312), Device("l40s-48gb", 44.4, 864, 16, 91.6, 362),
        Device("a10-24gb", 22.1, 600, 16, 31.2, 125), Device("l4-24gb", 22.0, 300, 16, 30.3, 121),
        Device("rtx4090-24gb", 23.6, 1008, 16, 82.6, 165.2),
    )
}

DEVICES_PER_NODE = 8  # an HGX / DGX node; tensor ranks past it span nodes
# The reference's fixed reserve per rank: the CUDA context (~0.5 GiB on an H100 with lazy module
# loading), cuBLAS and NCCL workspaces, and the caching allocator's slack. It plays the part of
# vLLM's --reserve-gib, less the activations and CUDA graphs (the reference has no graphs, and its
# activations are counted on their own).
REFERENCE_OVERHEAD_GIB = 1.0
# One decoder layer's live tensors under no_grad, in hidden-widths of fp32 per token: the residual
# and its norm (2), q, k, v and the attention output (~3 with GQA), the gated MLP's gate, up and
# their product (3 x intermediate, ~2.7-3.5 hidden-widths each: ~10), rounded up to 16 for the
# allocator. Layers run one at a time without autograd, so nothing piles up across them; counted
# whole on every rank (the residual is replicated; the split MLP widths make this an upper bound).
HIDDEN_WIDTHS = 16


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
    reference: ReferenceSizing | None = None  # the fp32 reference on devices of its own, tensor parallel

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


@dataclass(frozen=True)
class Traffic:
    """What the reference must keep up with: the candidate's output tokens/s summed over its
    replicas, the share of requests scored (serve's --shadow-rate), prompt tokens per
    completion token (the reference re-reads the prompt), and the share of peak FLOP/s a
    forward pass reaches (MFU)."""

    candidate_tokens_per_s: float = 10_000.0
    shadow_rate: float = 0.05
    prompt_ratio: float = 1.0
    mfu: float = 0.4

    @property
    def scored_tokens_per_s(self) -> float:
        return self.candidate_tokens_per_s * self.shadow_rate * (1 + self.prompt_ratio)


@dataclass(frozen=True)
class RankMemory:
    """The reference's bytes on one of `ranks` tensor-parallel ranks."""

    ranks: int
    fp32_weights: float  # parameters x 4 / ranks
    noise_copy: float  # parameters x 2 / ranks in the serving dtype; 0 without one
    logits: float  # one scored batch's full-vocabulary logits, on every rank
    hidden_states: float  # one layer's live activations
    overhead: float  # REFERENCE_OVERHEAD_GIB

    @property
    def total(self) -> float:
        return self.fp32_weights + self.noise_copy + self.logits + self.hidden_states + self.overhead


@dataclass(frozen=True)
class Replicas:
    """Reference replicas of `ranks` devices each for a traffic, from FLOPs per scored token."""

    traffic: Traffic
    ranks: int
    fp32_flops: float  # per scored token: 2 x parameters
    noise_flops: float  # per scored token: 2 x parameters for the noise pass; 0 without one
    fp32_tflops: float
    bf16_tflops: float
    replica_tokens_per_s: float
    replicas: int


@dataclass(frozen=True)
class ReferenceSizing:
    """The fp32 reference on devices of its own, split by tensor parallelism."""

    parameters: int
    hidden_size: int
    vocab_size: int
    noise_dtype: str | None  # the noise copy's dtype; None: no copy (fp32 serving, or the noise floor off)
    batch_tokens: int
    logit_bytes: int  # bytes per scored position and vocabulary id at the batch's peak
    usable: float  # bytes a rank may use: the device's usable memory
    by_size: tuple[RankMemory, ...]  # at every size the model divides by
    tensor_parallel: int | None  # the least of those sizes that fits; None: none does
    given: int | None  # --reference-tensor-parallel-size
    memory_ranks: int | None  # ranks memory alone asks for (any count); None: not even one layer's share fits
    cap: str  # why no size the model divides by reaches memory_ranks; "" when one fits
    replicas: Replicas | None  # None: no size fits, or the device's FLOP/s are unknown

    embedding: int = 0  # parameters whole on every rank (an untied input embedding)

    @property
    def ranks(self) -> int | None:
        """The size the replicas are built from: the one given when it fits, else the least that fits."""
        if self.given is not None and self.at(self.given).total <= self.usable:
            return self.given
        return self.tensor_parallel

    @property
    def nodes(self) -> int | None:
        return None if self.ranks is None else math.ceil(self.ranks / DEVICES_PER_NODE)

    def at(self, ranks: int) -> RankMemory:
        return next(m for m in self.by_size if m.ranks == ranks)


def noise_dtype(dtype: str, noise_floor: bool) -> str | None:
    """The noise copy is the reference in the serving dtype (2 bytes a parameter); int8 and int4
    weights serve bf16 activations. A float32 candidate has none: the fp32 reference is its own
    noise floor."""
    if not noise_floor or dtype == "fp32":
        return None
    return dtype if dtype in ("bf16", "fp16") else "bf16"


def rank_memory(config: dict, params: int, ranks: int, noise: str | None, batch_tokens: int) -> RankMemory:
    """Every parameter but an untied input embedding is split by `ranks`: transformers' plans
    for Llama-family models and the native InternLM2 one keep that table whole on every rank
    (the head's vocabulary rows are cut; the norms' few weights are replicated and not
    counted)."""
    whole = embedding_params(config)
    per_rank = (params - whole) / ranks + whole
    return RankMemory(
        ranks, per_rank * 4, per_rank * BYTES[noise] if noise else 0.0,
        batch_tokens * config["vocab_size"] * logit_bytes(noise),
        batch_tokens * config["hidden_size"] * 4 * HIDDEN_WIDTHS, REFERENCE_OVERHEAD_GIB * GIB)


def embedding_params(config: dict) -> int:
    """Parameters held whole on every rank: an untied input embedding. A tied one is the
    head's weight, which the plans cut by vocabulary rows (measured on SmolLM2: each of 3
    ranks holds exactly a third of the fp32 parameters)."""
    return 0 if config.get("tie_word_embeddings", False) else config["vocab_size"] * config["hidden_size"]


def logit_bytes(noise: str | None) -> int:
    """Per scored position and id, worst case (one sequence fills the batch): the fp32 logits (4)
    and, beside them, the noise pass's (2), then one row's fp32 log-softmax (the noise logits
    cast to fp32 and their log-softmax, 8). Without a noise copy: fp32 logits + log-softmax (8)."""
    return 4 + 2 + 8 if noise else 4 + 4


def replicas_for(params: int, ranks: int, noise: str | None, device: Device, traffic: Traffic) -> Replicas | None:
    """2 FLOPs a parameter per scored token per pass (attention's context-length FLOPs left out);
    the fp32 pass at the fp32 rate with TF32 off, the noise pass at the bf16 tensor-core rate,
    both at `traffic.mfu`. Tensor ranks add compute: a replica has `ranks` devices' FLOP/s."""
    if device.fp32_tflops is None or device.bf16_tflops is None:
        return None
    fp32, noise_flops = 2 * params, 2 * params if noise else 0
    seconds = (fp32 / (device.fp32_tflops * 1e12) + noise_flops / (device.bf16_tflops * 1e12)) / traffic.mfu
    per_replica = ranks / seconds
    return Replicas(traffic, ranks, fp32, noise_flops, device.fp32_tflops, device.bf16_tflops, per_replica,
                    math.ceil(traffic.scored_tokens_per_s / per_replica))


def cap_reason(config: dict, ranks: int) -> str:
    """Why the model cannot split over `ranks` or more: a dimension smaller than that caps the
    size outright (a rank holds whole heads), else `ranks` itself does not divide them."""
    small = [f"{value} {name}" for name, value in dimensions(config).items() if value < ranks]
    if small:
        return f"its {' and '.join(small)} cap the size: each rank holds whole ones"
    return "; ".join(problems(config, ranks))


def size_reference(config: dict, params: int, device: Device, dtype: str, given: int | None, traffic: Traffic,
                   noise_floor: bool = True, batch_tokens: int = 2048) -> ReferenceSizing:
    """The least tensor-parallel size, among those the model divides by, whose per-rank memory
    fits the device's usable memory; a `given` size that does not divide is refused."""
    if given is not None and (refused := problems(config, given)):
        raise PlanError(f"--reference-tensor-parallel-size {given}: " + "; ".join(refused))
    noise = noise_dtype(dtype, noise_floor)
    usable = device.memory_gib * GIB
    by_size = tuple(rank_memory(config, params, n, noise, batch_tokens) for n in divisors(config))
    fitting = [m.ranks for m in by_size if m.total <= usable]
    one = by_size[0]
    room = usable - (one.logits + one.hidden_states + one.overhead)
    # Ranks n with (params − embedding) / n + embedding in fp32 and the noise dtype fitting the room.
    per_param = 4 + (BYTES[noise] if noise else 0)
    whole = embedding_params(config) * per_param
    memory_ranks = math.ceil((params * per_param - whole) / (room - whole)) if room > whole else None
    cap = cap_reason(config, memory_ranks) if not fitting and memory_ranks else ""
    sizing = ReferenceSizing(params, config["hidden_size"], config["vocab_size"], noise, batch_tokens,
                             logit_bytes(noise), usable, by_size,
                             fitting[0] if fitting else None, given, memory_ranks, cap, None,
                             embedding_params(config))
    if sizing.ranks is None:
        return sizing
    return dataclasses.replace(sizing, replicas=replicas_for(params, sizing.ranks, noise, device, traffic))


def plan(config: dict, device: Device, tensor_parallel: int = 1, dtype: str = "bf16", kv_dtype: str | None = None,
         gpu_memory_utilization: float = 0.9, reserve_gib: float = 1.5, shadow_batch_tokens: int = 2048,
         kv_cache_gib: float | None = None, reference_tensor_parallel: int | None = None,
         traffic: Traffic = Traffic(), noise_floor: bool = True) -> Plan:
    """`kv_cache_gib` fixes the KV cache's size (serve's --kv-cache-gib) instead of what is left.
    `reference_tensor_parallel`, `traffic` and `noise_floor` size the reference on its own devices."""
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
                fitting[0] if fitting else None,
                size_reference(config, params, device, dtype, reference_tensor_parallel, traffic, noise_floor,
                               shadow_batch_tokens))


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
            f"needs {p.reference_devices} device(s) of its own (`shadowserve reference`, a device map across them)")
        + "; without the serving-dtype noise copy the reference also holds (the sizing below counts it)",
    ]
    if p.reference is not None:
        lines += ["", *render_reference(p.reference, p.device)]
    return "\n".join(lines)


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def render_reference(r: ReferenceSizing, device: Device) -> list[str]:
    return [*_render_rank(r), "", *_render_size(r), *([""] + _render_replicas(r.replicas, device) if r.ranks else [])]


def _render_rank(r: ReferenceSizing) -> list[str]:
    m = r.at(r.ranks or r.by_size[-1].ranks)
    n, noise = m.ranks, r.noise_dtype
    logits = (f"fp32 logits 4 + {noise} noise logits 2 + one row's fp32 log-softmax 8" if noise
              else "fp32 logits 4 + their log-softmax 4")
    return [
        "fp32 reference on devices of its own, tensor parallel (N ranks over torch.distributed, every rank "
        "computes). Every parameter but an untied input embedding is split by N (transformers' Llama-family plans "
        "and the native InternLM2 one keep the embedding whole on every rank); the scored batch's logits are not.",
        "",
        f"| per rank at N = {n} | memory | arithmetic |",
        "|---|---|---|",
        (f"| fp32 weights | {_gib(m.fp32_weights)} | ({r.parameters:.3g} params − {r.embedding:.3g} embedding) × 4 "
         f"bytes / {n} + the embedding × 4 bytes |" if r.embedding else
         f"| fp32 weights | {_gib(m.fp32_weights)} | {r.parameters:.3g} params × 4 bytes / {n} (the tied embedding is "
         "the head's weight, cut with it) |"),
        f"| noise copy | {_gib(m.noise_copy)} | " + (
            f"the same in {noise}, the serving dtype ({BYTES[noise]:g} bytes a parameter) |" if noise else
            "none: a float32 candidate's noise floor is the fp32 reference itself, or the noise floor is off |"),
        f"| logits | {_gib(m.logits)} | {r.batch_tokens:,} scored positions (serve's --shadow-batch-tokens, at most) "
        f"× {r.vocab_size:,} ids × {r.logit_bytes} bytes ({logits}); the full vocabulary on every rank: the head "
        "gathers its output |",
        f"| hidden states | {_gib(m.hidden_states)} | {r.batch_tokens:,} tokens × {r.hidden_size:,} × 4 bytes × "
        f"{HIDDEN_WIDTHS} (one layer's live tensors under no_grad, layers one at a time) |",
        f"| overhead | {_gib(m.overhead)} | CUDA context, cuBLAS and NCCL workspaces, the allocator's slack |",
        f"| total | {_gib(m.total)} | of {r.usable / GIB:g} GiB usable: {'fits' if m.total <= r.usable else 'does not fit'} |",
    ]


def _render_size(r: ReferenceSizing) -> list[str]:
    sizes = ", ".join(f"{m.ranks} → {_gib(m.total)}{'' if m.total <= r.usable else ' (no)'}" for m in r.by_size)
    lines = [f"per rank at each size the model divides by: {sizes}"]
    if r.given is not None:
        m = r.at(r.given)
        lines.append(f"--reference-tensor-parallel-size {r.given}: {_gib(m.total)} a rank, " + (
            "fits: the replicas below use it" if m.total <= r.usable else f"does not fit {r.usable / GIB:g} GiB"))
    if r.tensor_parallel is not None:
        lines.append(f"reference tensor-parallel size: {r.tensor_parallel}, the least that fits; a replica is "
                     f"{r.ranks} rank(s) on {r.nodes} node(s) of {DEVICES_PER_NODE} devices "
                     f"(`shadowserve reference --tensor-parallel-size {r.ranks}`)")
        return lines
    top = r.by_size[-1].ranks
    if r.memory_ranks is None:
        lines.append("no tensor-parallel size fits: one scored batch's logits and activations alone exceed a "
                     "device (a smaller serve --shadow-batch-tokens)")
    else:
        lines.append(f"no tensor-parallel size fits: memory asks for at least {r.memory_ranks} ranks "
                     f"({math.ceil(r.memory_ranks / DEVICES_PER_NODE)} nodes of {DEVICES_PER_NODE}), but the model "
                     f"splits over at most {top} ({r.cap}); going past it needs pipeline stages across nodes, "
                     "which the reference does not have")
    return lines


def _render_replicas(x: Replicas | None, device: Device) -> list[str]:
    if x is None:
        return ["replicas: the device's fp32 and bf16 TFLOP/s are unknown (give --device)"]
    t = x.traffic
    passes = f"2 × {x.fp32_flops / 2:.3g} (fp32 pass)" + (
        f" + 2 × {x.noise_flops / 2:.3g} (noise pass)" if x.noise_flops else "")
    seconds = f"{x.fp32_flops:.3g} / {x.fp32_tflops:g}e12 FLOP/s (fp32, TF32 off)" + (
        f" + {x.noise_flops:.3g} / {x.bf16_tflops:g}e12 FLOP/s (bf16 tensor cores)" if x.noise_flops else "")
    return [
        f"reference replicas for {t.candidate_tokens_per_s:,.0f} candidate output tokens/s (summed over its "
        f"replicas) at shadow rate {t.shadow_rate:g}, prompt:completion tokens {t.prompt_ratio:g}:1 (the "
        f"reference re-reads the prompt), MFU {t.mfu:g}:",
        f"- scored tokens/s = {t.candidate_tokens_per_s:,.0f} × {t.shadow_rate:g} × (1 + {t.prompt_ratio:g}) "
        f"= {t.scored_tokens_per_s:,.0f}",
        f"- FLOPs per scored token = {passes} = {x.fp32_flops + x.noise_flops:.3g} (attention's context-length "
        "FLOPs left out)",
        f"- one replica = {x.ranks} rank(s) × {t.mfu:g} / ({seconds}) = {x.replica_tokens_per_s:,.0f} tokens/s",
        f"- replicas = ceil({t.scored_tokens_per_s:,.0f} / {x.replica_tokens_per_s:,.0f}) = {x.replicas} "
        f"({x.replicas * x.ranks} {device.name} device(s))",
    ]
