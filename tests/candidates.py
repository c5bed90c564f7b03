"""Candidates built from the real SmolLM2 weights: conversion bugs of the kinds people
report, and noise controls that only change precision. Each is a Hugging Face directory
served as it is, with the reference (and adapter) it must be judged against.

Bugs (the verdict must fail them):
- rope_theta: config rope theta 1e4 instead of 1e5 (a config mapping that lost the value)
- attention_scale: attention logits x 16/14.96, the TransformerLens case (q_proj scaled)
- kv_swapped: k and v swapped when splitting a packed wqkv
- tp_rank_order: tensor-parallel shards merged in the wrong rank order (real `merge-tp`)
- rotary_layout: q/k left in the interleaved rotary layout (the HF permutation not applied)
- lora_bf16_merge_fp16: a LoRA merged into a bf16 base, saved in bf16 and served in fp16
  (the report cited in docs/design.md: wrong answers in fp16 inference)

Also for `diagnose` (its tests): norm_eps (config), a LoRA merged twice or at the wrong
scale (lora_merged), and the weights cast to bf16/fp16 on disk (cast_weights).

Controls (precision only; the verdict must pass them):
- bf16 / fp16: the reference's own weights served in that dtype
- lora_fp32_merge_bf16: the LoRA merged in fp32 (`merge-lora`), served in bf16, judged
  against base + the unmerged adapter
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

NON_WEIGHT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str  # "bug" or "control"
    path: Path
    reference: Path
    dtype: str
    adapter: Path | None = None


def _copy_non_weights(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in NON_WEIGHT_FILES:
        shutil.copy2(src / name, dst / name)


def _with_weights(src: Path, dst: Path, change) -> Path:
    _copy_non_weights(src, dst)
    weights = load_file(src / "model.safetensors")
    change(weights, json.loads((src / "config.json").read_text()))
    save_file({k: v.contiguous() for k, v in weights.items()}, dst / "model.safetensors")
    return dst


def _layers(config: dict):
    return [f"model.layers.{i}.self_attn." for i in range(config["num_hidden_layers"])]


def rope_theta(src: Path, dst: Path) -> Path:
    _copy_non_weights(src, dst)
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 10000.0
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def attention_scale(src: Path, dst: Path) -> Path:
    def change(w, config):
        for p in _layers(config):  # q.k scales with q: every attention logit x 16/14.96
            w[p + "q_proj.weight"] = w[p + "q_proj.weight"] * (16 / 14.96)
    return _with_weights(src, dst, change)


def attention_scale_mild(src: Path, dst: Path, scale: float = 1.03) -> Path:
    """Every attention logit x 1.03: KL 1.8x the noise floor's (within the 2x tolerance), not noise."""
    def change(w, config):
        for p in _layers(config):
            w[p + "q_proj.weight"] = w[p + "q_proj.weight"] * scale
    return _with_weights(src, dst, change)


def kv_swapped(src: Path, dst: Path) -> Path:
    def change(w, config):
        for p in _layers(config):
            w[p + "k_proj.weight"], w[p + "v_proj.weight"] = w[p + "v_proj.weight"], w[p + "k_proj.weight"]
    return _with_weights(src, dst, change)


def gate_up_swapped(src: Path, dst: Path) -> Path:
    """InternLM2's w1 and w3 taken the wrong way round (w1 is the gate, w3 the up projection)."""
    def change(w, config):
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}.mlp."
            w[p + "gate_proj.weight"], w[p + "up_proj.weight"] = w[p + "up_proj.weight"], w[p + "gate_proj.weight"]
    return _with_weights(src, dst, change)


def query_heads_group_major(src: Path, dst: Path) -> Path:
    """The query heads of a packed wqkv read group-major ([g, kv_heads]) instead of per KV
    head ([kv_heads, g]): query head i then attends with the wrong key/value head."""
    def change(w, config):
        kv = config["num_key_value_heads"]
        g = config["num_attention_heads"] // kv
        for p in _layers(config):
            q = w[p + "q_proj.weight"]
            w[p + "q_proj.weight"] = q.view(kv, g, -1, q.shape[1]).transpose(0, 1).reshape(q.shape)
    return _with_weights(src, dst, change)


def rotary_layout(src: Path, dst: Path) -> Path:
    """Meta's interleaved rotary layout left in place: the inverse of the row permutation
    transformers' Llama converter applies to q_proj and k_proj."""
    def unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
        rows, cols = weight.shape
        return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)

    def change(w, config):
        for p in _layers(config):
            w[p + "q_proj.weight"] = unpermute(w[p + "q_proj.weight"], config["num_attention_heads"])
            w[p + "k_proj.weight"] = unpermute(w[p + "k_proj.weight"], config["num_key_value_heads"])
    return _with_weights(src, dst, change)


def tp_rank_order(src: Path, dst: Path, tp: int = 3, order: tuple[int, ...] = (1, 0, 2)) -> Path:
    """Split into `tp` ranks by the tensor-parallel rules, write rank r's file under the
    name of rank order[r], and merge with the real `merge-tp`."""
    from adapters.tp_merge import merge_tp, rule_for

    shards = dst.with_name(dst.name + "-shards")
    _copy_non_weights(src, shards)
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for name, tensor in load_file(src / "model.safetensors").items():
        _, dim = rule_for(name)
        parts = [tensor] * tp if dim is None else list(torch.chunk(tensor, tp, dim=dim))
        for rank, part in zip(ranks, parts):
            rank[name] = part.contiguous().clone()
    for r, state in enumerate(ranks):
        save_file(state, shards / f"model_tp{order[r]}.safetensors")
    return merge_tp(shards, dst)


def lora_adapter(base: Path, dst: Path, scale: float = 0.15, seed: int = 1234, rank: int = 8) -> Path:
    """A seeded rank-8 adapter on every linear layer whose effect on the model is well
    above bf16 noise (KL(base || base + adapter) ~ 10x the bf16 noise KL), so judging a
    merged candidate against the base alone would fail."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    model.save_pretrained(dst)
    return dst


def lora_bf16_merge(base: Path, adapter: Path, dst: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The naive merge: base loaded in bf16 (or `dtype`), peft merges into the
    low-precision weights, saved in that dtype."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter)
    merged = model.merge_and_unload()
    merged.save_pretrained(dst)
    AutoTokenizer.from_pretrained(base).save_pretrained(dst)
    return dst


def lora_fp32_merge(base: Path, adapter: Path, dst: Path) -> Path:
    """The right merge: shadowserve's `merge-lora` (fp32 merge, one cast to bf16)."""
    from adapters.lora_merge import merge_lora

    merge_lora(base, adapter, dst, "bf16")
    return dst


def cast_weights(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """The reference's own weights, cast once and saved in `dtype` (a precision-only control)."""
    def change(w, config):
        for name, tensor in w.items():
            w[name] = tensor.to(dtype)
    out = _with_weights(src, dst, change)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "dtype": str(dtype).removeprefix("torch.")}))
    return out


def norm_eps(src: Path, dst: Path, eps: float = 1e-6) -> Path:
    """A config mapping that dropped the norm epsilon (the transformers default 1e-6 where
    the model has 1e-5); the weights are the reference's own."""
    _copy_non_weights(src, dst)
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["rms_norm_eps"] = eps
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def layer_renumbered(src: Path, dst: Path, layer: int = 15) -> Path:
    """A pipeline merge off by one at a stage boundary: layer `layer` written with the
    weights of layer `layer` − 1 (its own are lost)."""
    def change(w, config):
        for name in [n for n in w if n.startswith(f"model.layers.{layer}.")]:
            w[name] = w[name.replace(f"layers.{layer}.", f"layers.{layer - 1}.")].clone()
    return _with_weights(src, dst, change)


def norm_minus_one(src: Path, dst: Path) -> Path:
    """Every RMSNorm weight written in Gemma's (1 + w) convention (stored w − 1) into a
    Llama model, whose forward multiplies by the stored weight."""
    def change(w, config):
        for name in [n for n in w if n.endswith("norm.weight")]:
            w[name] = w[name] - 1
    return _with_weights(src, dst, change)


def embedding_rows_exchanged(src: Path, dst: Path, rows: tuple[int, int] = (1000, 2000)) -> Path:
    """Two token rows of the (tied) embedding exchanged, the tokenizer left as it was."""
    def change(w, config):
        embed = w["model.embed_tokens.weight"].clone()
        embed[list(rows)] = embed[list(reversed(rows))]
        w["model.embed_tokens.weight"] = embed
    return _with_weights(src, dst, change)


def q_scaled_one_layer(src: Path, dst: Path, layer: int = 29, scale: float = 1.10) -> Path:
    """One layer's q_proj scaled by 1.10 (its attention logits x 1.10): a small bug whose drift
    the verdict may call noise, but a named departure in the weights."""
    def change(w, config):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        w[name] = w[name] * scale
    return _with_weights(src, dst, change)


def with_alpha(adapter: Path, dst: Path, lora_alpha: float) -> Path:
    """The adapter with its lora_alpha replaced: its update applied at the wrong scale
    (an adapter converted for serving that lost or doubled its scale)."""
    shutil.copytree(adapter, dst, dirs_exist_ok=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": lora_alpha}))
    return dst


def lora_merged(base: Path, adapter: Path, dst: Path, times: int = 1, lora_alpha: float | None = None) -> Path:
    """peft's fp32 merge, `times` times over (2: merged twice), optionally with the adapter's
    lora_alpha replaced (a merge at the wrong scale)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if lora_alpha is not None:
        adapter = with_alpha(adapter, dst.with_name(dst.name + "-adapter"), lora_alpha)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    for _ in range(times):
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(dst)
    for name in NON_WEIGHT_FILES[1:]:
        shutil.copy2(base / name, dst / name)
    return dst


# name -> (kind, serving dtype, judged against base + adapter, maker(demo, adapter, out) or None for the demo itself)
SPECS = {
    "rope_theta": ("bug", "bfloat16", False, lambda demo, adapter, out: rope_theta(demo, out)),
    "attention_scale": ("bug", "bfloat16", False, lambda demo, adapter, out: attention_scale(demo, out)),
    "kv_swapped": ("bug", "bfloat16", False, lambda demo, adapter, out: kv_swapped(demo, out)),
    "tp_rank_order": ("bug", "bfloat16", False, lambda demo, adapter, out: tp_rank_order(demo, out)),
    "rotary_layout": ("bug", "bfloat16", False, lambda demo, adapter, out: rotary_layout(demo, out)),
    "lora_bf16_merge_fp16": ("bug", "float16", True, lora_bf16_merge),
    "attention_scale_mild": ("mild", "bfloat16", False, lambda demo, adapter, out: attention_scale_mild(demo, out)),
    "bf16": ("control", "bfloat16", False, None),
    "fp16": ("control", "float16", False, None),
    "lora_fp32_merge_bf16": ("control", "bfloat16", True, lora_fp32_merge),
}
BUGS = tuple(name for name, spec in SPECS.items() if spec[0] == "bug")
CONTROLS = tuple(name for name, spec in SPECS.items() if spec[0] == "control")


def build(name: str, demo: Path, root: Path) -> Candidate:
    """Build candidate `name` under `root` once; later calls reuse the directory."""
    kind, dtype, with_adapter, maker = SPECS[name]
    adapter = root / "adapter" if with_adapter else None
    if adapter is not None and not adapter.exists():
        lora_adapter(demo, adapter)
    path = demo if maker is None else root / name
    if maker is not None and not path.exists():
        maker(demo, adapter, path)
    return Candidate(name, kind, path, demo, dtype, adapter)


# Tokenizer and template candidates (diagnose)


def wrong_generation_eos(src: Path, dst: Path) -> Path:
    """generation_config.json's eos_token_id 0 ('<|endoftext|>') where the chat ends its turns
    with 2 ('<|im_end|>'): transformers' generate() runs on past each answer (the InternLM2 trap)."""
    _copy_non_weights(src, dst)
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    generation = json.loads((src / "generation_config.json").read_text())
    (dst / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 0}))
    return dst


def template_without_system(src: Path, dst: Path) -> Path:
    """The chat template with messages of role system skipped: the system prompt never
    reaches the model."""
    _copy_non_weights(src, dst)
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    template = (src / "chat_template.jinja").read_text()
    loop, end = "{% for message in messages %}", "{% endfor %}"
    if template.count(loop) != 1 or template.count(end) != 1:
        raise ValueError(f"{src / 'chat_template.jinja'}: not the one-loop ChatML template this candidate rewrites")
    rewritten = (template.replace(loop, loop + "{% if message['role'] != 'system' %}")
                 .replace(end, "{% endif %}" + end))
    (dst / "chat_template.jinja").write_text(rewritten)
    return dst


# Correct conversions that once read as departures (issue 35)


def untied_head(src: Path, dst: Path, dtype: torch.dtype = torch.bfloat16, damage: float = 0.0) -> Path:
    """The output head written out as its own tensor (`tie_word_embeddings: false`), equal to
    the embedding cast to `dtype` (a common, correct export of a tied model); with `damage`,
    one token's head row moved by that much (an untied head that is not the embedding). The
    reference's weights stay linked; the head is a second shard, named in an HF index."""
    _copy_non_weights(src, dst)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    (dst / first).symlink_to(src / "model.safetensors")
    with safe_open(src / "model.safetensors", "pt") as f:
        names, head = list(f.keys()), f.get_tensor("model.embed_tokens.weight").clone()
    head[1000] += damage
    save_file({"lm_head.weight": head.to(dtype).contiguous()}, dst / second)
    index = {"metadata": {}, "weight_map": {**{n: first for n in names}, "lm_head.weight": second}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return dst


def cast_twice(src: Path, dst: Path, via: torch.dtype = torch.float16, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The reference's weights cast to `via`, then to `dtype` (fp32 → fp16 → bf16: an export
    in fp16 converted again), saved in `dtype`: precision only, no arithmetic."""
    def change(w, config):
        for name, tensor in w.items():
            w[name] = tensor.to(via).to(dtype)
    out = _with_weights(src, dst, change)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "dtype": str(dtype).removeprefix("torch.")}))
    return out
