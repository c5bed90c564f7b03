"""Real-weight fixtures built from SmolLM2 (GQA: 9 query / 3 KV heads): an InternLM2-layout
checkpoint, its tensor-parallel shards, and a seeded LoRA adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="session")
def smol_weights(demo_model: Path) -> dict[str, torch.Tensor]:
    return load_file(demo_model / "model.safetensors")


@pytest.fixture(scope="session")
def smol_config(demo_model: Path) -> dict:
    return json.loads((demo_model / "config.json").read_text())


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """InternLM2's packing: per KV group [q_0 .. q_{g-1}, k, v], rows (h gs d)."""
    d, hidden = k.shape[0] // kv_heads, k.shape[1]
    g = heads // kv_heads
    return torch.cat([q.view(kv_heads, g, d, hidden), k.view(kv_heads, 1, d, hidden), v.view(kv_heads, 1, d, hidden)],
                     dim=1).reshape(-1, hidden)


def internlm2_state(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    out = {
        "model.tok_embeddings.weight": weights["model.embed_tokens.weight"],
        "output.weight": weights["model.embed_tokens.weight"].clone(),  # InternLM2 keeps an untied head
        "model.norm.weight": weights["model.norm.weight"],
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "attention.wqkv.weight"] = pack_wqkv(weights[p + "self_attn.q_proj.weight"], weights[p + "self_attn.k_proj.weight"],
                                                     weights[p + "self_attn.v_proj.weight"], heads, kv)
        out[p + "attention.wo.weight"] = weights[p + "self_attn.o_proj.weight"]
        out[p + "feed_forward.w1.weight"] = weights[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = weights[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = weights[p + "mlp.down_proj.weight"]
        out[p + "attention_norm.weight"] = weights[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = weights[p + "post_attention_layernorm.weight"]
    return out


def internlm2_config(config: dict) -> dict:
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
            "pad_token_id", "hidden_act", "initializer_range")
    return {**{k: config[k] for k in keep}, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
            "bias": False, "rope_theta": config["rope_parameters"]["rope_theta"], "rope_scaling": None,
            "tie_word_embeddings": False, "torch_dtype": "float32",
            "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy2(src / name, dst / name)


@pytest.fixture(scope="session")
def internlm2_dir(demo_model, smol_weights, smol_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("internlm2")
    save_file(internlm2_state(smol_weights, smol_config), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(internlm2_config(smol_config)))
    copy_tokenizer(demo_model, out)
    return out


def split_for_tp(state: dict[str, torch.Tensor], tp: int) -> list[dict[str, torch.Tensor]]:
    from adapters.tp_merge import rule_for

    ranks = [{} for _ in range(tp)]
    for name, tensor in state.items():
        _, dim = rule_for(name)
        parts = [tensor] * tp if dim is None else list(torch.chunk(tensor, tp, dim=dim))
        for rank, part in zip(ranks, parts):
            rank[name] = part.clone()
    return ranks


def stage_of(state: dict[str, torch.Tensor], first: int, last: int, n_layers: int) -> dict[str, torch.Tensor]:
    """Layers first..last renumbered from 0; embeddings with stage 0, norm/output with the last."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            if first <= i <= last:
                out[name.replace(f"model.layers.{i}.", f"model.layers.{i - first}.", 1)] = tensor
        elif (name == "model.tok_embeddings.weight" and first == 0) or (name != "model.tok_embeddings.weight" and last == n_layers - 1):
            out[name] = tensor
    return out


@pytest.fixture(scope="session")
def tp_shards_dir(internlm2_dir, smol_weights, smol_config, tmp_path_factory) -> Path:
    """TP=3 x PP=2 as `.pt` files (rank r holds KV group r of every layer)."""
    out = tmp_path_factory.mktemp("tp3pp2")
    state = internlm2_state(smol_weights, smol_config)
    n = smol_config["num_hidden_layers"]
    for p, (first, last) in enumerate([(0, n // 2 - 1), (n // 2, n - 1)]):
        for t, rank in enumerate(split_for_tp(stage_of(state, first, last, n), 3)):
            torch.save(rank, out / f"model_tp{t}_pp{p}.pt")
    shutil.copy2(internlm2_dir / "config.json", out / "config.json")
    copy_tokenizer(internlm2_dir, out)
    return out


@pytest.fixture(scope="session")
def internevo_sets(demo_model, smol_weights, smol_config, tmp_path_factory):
    """Lazily, per case of `internevo_shards.CASES`: (shard dir, merged dir, Llama dir,
    the full InternEvo state the shards were cut from)."""
    from adapters.internlm2 import convert_internlm2_to_llama
    from adapters.tp_merge import merge_tp
    from tests.adapters.internevo_shards import CASES, head_scale, internevo_state, write_shards

    cache = {}

    def build(case: str):
        if case not in cache:
            spec, flags = CASES[case]
            state = internevo_state(smol_weights, smol_config, spec,
                                    head_scale(smol_config["vocab_size"]) if spec.norm_head else None)
            root = tmp_path_factory.mktemp(case)
            src = write_shards(state, smol_config, spec, root / "shards")
            copy_tokenizer(demo_model, src)
            if spec.model_config is None:
                (src / "config.json").write_text(json.dumps(internlm2_config(smol_config)))
            merged = merge_tp(src, root / "merged", flags)
            cache[case] = (src, merged, convert_internlm2_to_llama(merged, root / "llama"), state)
        return cache[case]

    return build


def padded(prompts: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """A batch of prompts padded with id 0 (left or right), its attention mask, and each row's real span."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    spans = []
    for row, p in enumerate(prompts):
        span = slice(width - len(p), width) if left else slice(0, len(p))
        ids[row, span], mask[row, span] = torch.tensor(p), 1
        spans.append(span)
    return ids, mask, spans
