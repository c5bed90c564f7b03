"""Size arithmetic of a model from its config.json: parameters, weight bytes per
precision, and KV-cache bytes (GQA-aware), like "20e9 × 2 bytes ≈ 37 GiB"."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters.model_dir import read_config

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
GIB = 2**30


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    weight_bytes: dict[str, float]
    kv_bytes_per_token: int  # K and V, all layers, in the KV dtype
    max_context: int
    kv_dtype: str

    @property
    def kv_bytes_at_max_context(self) -> int:
        return self.kv_bytes_per_token * self.max_context


def parameter_count(config: dict) -> int:
    """Decoder-only transformer with GQA attention and a gated MLP (Llama, InternLM2, Qwen2, ...)."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    attention = h * heads * d + 2 * h * kv * d + heads * d * h
    if config.get("attention_bias") or config.get("bias"):
        attention += heads * d + 2 * kv * d + h  # q, k, v and o biases
    mlp = 3 * h * inter + (2 * inter + h if config.get("mlp_bias") else 0)
    per_layer = attention + mlp + 2 * h  # two RMSNorm weights
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * per_layer + h  # + final norm


def inspect_config(config: dict, kv_dtype: str = "bf16") -> ModelSize:
    params = parameter_count(config)
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or config["hidden_size"] // heads
    per_token = int(2 * config["num_hidden_layers"] * kv * d * BYTES[kv_dtype])
    return ModelSize(params, {name: params * b for name, b in BYTES.items()}, per_token,
                     config.get("max_position_embeddings", 0), kv_dtype)


def inspect_model(path: Path, kv_dtype: str = "bf16") -> ModelSize:
    """PATH is a model directory or a bare config.json."""
    return inspect_config(read_config(path, allow_file=True), kv_dtype)


def render(size: ModelSize) -> str:
    lines = [f"parameters: {size.parameters:,} ({size.parameters:.3g})", "", "| dtype | weights | arithmetic |", "|---|---|---|"]
    for name, total in size.weight_bytes.items():
        lines.append(f"| {name} | {total / GIB:.2f} GiB | {size.parameters:.3g} × {BYTES[name]:g} bytes ≈ {total / GIB:.2f} GiB |")
    lines += ["", f"KV cache ({size.kv_dtype}): {size.kv_bytes_per_token:,} bytes per token "
                  f"({size.kv_bytes_per_token / 2**10:.0f} KiB); at max context {size.max_context:,} tokens: "
                  f"{size.kv_bytes_at_max_context / GIB:.2f} GiB per sequence"]
    return "\n".join(lines)
