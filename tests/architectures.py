"""Tiny Gemma-2, Qwen2 and Mistral models for the architecture tests: the real SmolLM2
tokenizer, chat template and vocabulary (49,152 ids, from the demo model), two layers,
hidden 256, four heads of 64 (two KV heads), fp32 weights drawn from a fixed seed.

The weights are scaled so that the model is not a uniform guesser: the output head
gives a next-token distribution whose top-1 probability is typically well above 0.3
(a bug must move real probability mass, as in a trained model), and the query/key
projections give peaked attention, so that what changes attention (its scale, its
soft-cap, its biases, its window) changes the output.

Each architecture comes with one bug of its own kind (the reference's own weights
unless said otherwise):
- gemma2: the config of seed 001's pair: `query_pre_attn_scalar` 56 where the model has
  64 (= head_dim: every attention logit x √64/√56 = 1.069, the 16/14.96 class) and both
  soft-caps (`attn_logit_softcapping`, `final_logit_softcapping`) null;
- qwen2: the q/k/v biases written as zeros. The realistic path: a converter that writes
  only the `.weight` tensors, its output loaded with transformers (which initialises the
  missing Linear biases to zero, with a "newly initialized" warning) and saved again: a
  Qwen2 checkpoint vLLM and transformers load without complaint. (Converting to a Llama
  or Mistral architecture without the biases is the other form; its weight pass reads
  the same tensors as "missing".)
- mistral: the sliding window lost from the config (`sliding_window` null where the
  model attends to the last 16 tokens): every prompt (~40 tokens with the chat
  template's system line) is longer than the window.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, INTERMEDIATE = 256, 4, 2, 64, 2, 512
WINDOW = 16  # mistral's sliding window, in tokens
# Weight scales (multiples of 1/√fan_in): peaked attention and a peaked output head.
QK_GAIN, LOGIT_SCALE, BIAS_STD = 2.5, 7.0, 1.0
# Gemma's output head is its embedding: a small one keeps the residual stream from being
# mostly the input token's own row (a model that repeats its input).
GEMMA_EMBED_RMS, GEMMA_LOGIT_SCALE, GEMMA_ROW_SPREAD = 0.02, 6.0, 0.4
SEED = 35


def _common(demo_config: dict) -> dict:
    return {
        "vocab_size": demo_config["vocab_size"], "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
        "bos_token_id": demo_config["bos_token_id"], "eos_token_id": demo_config["eos_token_id"],
        "pad_token_id": demo_config["pad_token_id"], "dtype": "float32",
    }


def gemma2_config(demo_config: dict) -> dict:
    return {**_common(demo_config), "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": HEAD_DIM,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096,
            "layer_types": ["sliding_attention", "full_attention"] * (LAYERS // 2),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": True}


def qwen2_config(demo_config: dict) -> dict:
    return {**_common(demo_config), "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "hidden_act": "silu", "use_sliding_window": False, "sliding_window": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": False}


def mistral_config(demo_config: dict) -> dict:
    return {**_common(demo_config), "architectures": ["MistralForCausalLM"], "model_type": "mistral",
            "hidden_act": "silu", "sliding_window": WINDOW,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False}


CONFIGS = {"gemma2": gemma2_config, "qwen2": qwen2_config, "mistral": mistral_config}


def _weights(model: torch.nn.Module, gemma: bool) -> None:
    """Overwrite every parameter from a fixed seed (fp32), in place."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Gemma's norms multiply by (1 + w): stored 0 is a plain RMSNorm. Its output head is
                # the (tied) embedding, so the final norm carries the logit scale there.
                final = name == "model.norm.weight"
                p.fill_((GEMMA_LOGIT_SCALE / GEMMA_EMBED_RMS - 1.0 if final else 0.0) if gemma else 1.0)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * BIAS_STD)
            elif name.endswith("embed_tokens.weight"):
                # Gemma multiplies the embedding by √hidden: stored at 1/√hidden, both are unit RMS.
                rows = torch.randn(p.shape, generator=g)
                if gemma:  # row norms spread (log-normal): a few tokens stand out, under the logit soft-cap
                    spread = torch.exp(torch.randn(p.shape[0], 1, generator=g) * GEMMA_ROW_SPREAD)
                    rows = rows * spread / spread.square().mean().sqrt() * (GEMMA_EMBED_RMS / math.sqrt(HIDDEN))
                p.copy_(rows)
            elif name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * (LOGIT_SCALE / math.sqrt(HIDDEN)))
            else:
                gain = QK_GAIN if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * (gain / math.sqrt(p.shape[1])))


def build_reference(arch: str, demo: Path, dst: Path) -> Path:
    """The fp32 reference of `arch` under `dst` (built once; later calls reuse it)."""
    if (dst / "model.safetensors").is_file():
        return dst
    from transformers import AutoConfig, AutoModelForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    config = CONFIGS[arch](json.loads((demo / "config.json").read_text()))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    _weights(model, gemma=arch == "gemma2")
    model.save_pretrained(dst)
    for name in TOKENIZER_FILES:
        shutil.copy2(demo / name, dst / name)
    return dst


def _with_config(src: Path, dst: Path, change: dict) -> Path:
    """`src` with its config.json changed (the weights linked, not copied)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name != "config.json" and not (dst / item.name).exists():
            (dst / item.name).symlink_to(item)
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **change}, indent=2))
    return dst


def gemma2_scalar_and_softcaps(src: Path, dst: Path) -> Path:
    return _with_config(src, dst, {"query_pre_attn_scalar": 56, "attn_logit_softcapping": None,
                                   "final_logit_softcapping": None})


def qwen2_bias_zeroed(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.name != "model.safetensors" and not (dst / item.name).exists():
            (dst / item.name).symlink_to(item)
    weights = load_file(src / "model.safetensors")
    for name in [n for n in weights if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]:
        weights[name] = torch.zeros_like(weights[name])
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def mistral_window_lost(src: Path, dst: Path) -> Path:
    return _with_config(src, dst, {"sliding_window": None})


BUGS = {"gemma2": gemma2_scalar_and_softcaps, "qwen2": qwen2_bias_zeroed, "mistral": mistral_window_lost}


@dataclass(frozen=True)
class Pair:
    arch: str
    reference: Path
    bug: Path


def build(arch: str, demo: Path, root: Path) -> Pair:
    reference = build_reference(arch, demo, root / arch)
    bug = root / f"{arch}-bug"
    if not bug.exists():
        BUGS[arch](reference, bug)
    return Pair(arch, reference, bug)
