"""InternLM2 (Hugging Face layout) -> Llama, tensor by tensor.

InternLM2 packs q, k and v into `attention.wqkv`, interleaved per KV group: viewed as
[num_kv_heads, g + 2, head_dim, hidden] with g = num_heads / num_kv_heads, each group
holds its g query heads, then its key head, then its value head. Llama wants them as
separate q/k/v_proj with query head i using key/value head i // g, which is exactly
that group order. Everything else is a rename.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from adapters.errors import AdapterError
from adapters.model_dir import read_config
from adapters.tensor_io import PlannedTensor, TensorSource, open_checkpoint, write_provenance, write_safetensors

RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_RENAMES = {
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Derived buffers some checkpoints carry; Llama recomputes them.
_SKIPPED = re.compile(r"rotary_emb\.inv_freq$")
_NOT_WEIGHTS = re.compile(r"^(config\.json|modeling_.*\.py|configuration_.*\.py|.*\.(safetensors|bin|pt|pth)"
                          r"|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json|provenance\.json)$")


def llama_config(config: dict) -> dict:
    """Map an InternLM2 config to a Llama one; refuse what Llama cannot express."""
    if config.get("bias", False):
        raise AdapterError("biased InternLM2 checkpoint (config 'bias': true): Llama's layout has no q/k/v/o biases to carry them")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    if heads % kv_heads:
        raise AdapterError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    rope = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    scaling = config.get("rope_scaling")
    if scaling:
        rope.update({k: v for k, v in scaling.items() if k != "type"})
        rope["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    keep = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "rms_norm_eps", "initializer_range", "bos_token_id", "eos_token_id",
            "pad_token_id", "tie_word_embeddings", "use_cache"]
    out = {k: config[k] for k in keep if k in config}
    out.update({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_key_value_heads": kv_heads,
        "head_dim": config["hidden_size"] // heads,
        "hidden_act": config.get("hidden_act", "silu"),
        "attention_bias": False,
        "mlp_bias": False,
        "rope_parameters": rope,
        "dtype": config.get("torch_dtype", config.get("dtype", "float32")),
    })
    return out


def split_wqkv(wqkv: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups = heads // kv_heads
    hidden = wqkv.shape[1]
    head_dim = wqkv.shape[0] // (kv_heads * (groups + 2))
    packed = wqkv.view(kv_heads, groups + 2, head_dim, hidden)
    q = packed[:, :groups].reshape(heads * head_dim, hidden)
    k = packed[:, groups].reshape(kv_heads * head_dim, hidden)
    v = packed[:, groups + 1].reshape(kv_heads * head_dim, hidden)
    return q, k, v


def plan_conversion(sources: dict[str, TensorSource], config: dict, dtype: torch.dtype | None) -> tuple[list[PlannedTensor], list[str]]:
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config["hidden_size"] // heads
    plan, skipped = [], []

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if dtype is None else t.to(dtype)

    def out_dtype(name: str) -> torch.dtype:
        return dtype or sources[name].dtype(name)

    last_split: dict[str, tuple[torch.Tensor, ...]] = {}

    def split_once(name: str) -> tuple[torch.Tensor, ...]:
        """q, k and v are written one after another: read and split each wqkv once."""
        if name not in last_split:
            last_split.clear()  # keep one layer's split in memory, not all of them
            last_split[name] = split_wqkv(sources[name].get(name), heads, kv_heads)
        return last_split[name]

    for name in sources:
        if name.endswith(".bias"):
            raise AdapterError(f"{name}: biased checkpoint; Llama's layout has no place for it")
        if _SKIPPED.search(name):
            skipped.append(name)
            continue
        if name in RENAMES:
            plan.append(PlannedTensor(RENAMES[name], sources[name].shape(name), out_dtype(name),
                                      lambda n=name: cast(sources[n].get(n))))
            continue
        match = _LAYER.match(name)
        if match is None or (match.group(2) not in LAYER_RENAMES and match.group(2) != "attention.wqkv.weight"):
            raise AdapterError(f"unknown key {name!r}: not part of the InternLM2 layout this tool converts")
        layer, rest = match.groups()
        prefix = f"model.layers.{layer}."
        if rest == "attention.wqkv.weight":
            rows, hidden = sources[name].shape(name)
            if rows != (heads + 2 * kv_heads) * head_dim:
                raise AdapterError(
                    f"{name}: shape [{rows}, {hidden}] does not fit the config (expected "
                    f"[{(heads + 2 * kv_heads) * head_dim}, {hidden}] for {heads} heads / {kv_heads} KV heads of {head_dim})")
            for index, size in enumerate((heads, kv_heads, kv_heads)):
                part = ("q_proj", "k_proj", "v_proj")[index]
                plan.append(PlannedTensor(
                    f"{prefix}self_attn.{part}.weight", (size * head_dim, hidden), out_dtype(name),
                    lambda n=name, i=index: cast(split_once(n)[i]),
                ))
        else:
            plan.append(PlannedTensor(prefix + LAYER_RENAMES[rest], sources[name].shape(name), out_dtype(name),
                                      lambda n=name: cast(sources[n].get(n))))
    return plan, skipped


def convert_internlm2_to_llama(src: Path, dst: Path, dtype: str | None = None) -> Path:
    """Convert SRC (InternLM2, HF layout, safetensors) into DST (Llama). Returns DST."""
    from adapters.tensor_io import DTYPE_NAMES

    config = read_config(src)
    if config.get("model_type") not in (None, "internlm2"):
        raise AdapterError(f"{src}: model_type is {config.get('model_type')!r}, not 'internlm2'")
    out_config = llama_config(config)
    torch_dtype = DTYPE_NAMES[dtype] if dtype else None
    if torch_dtype is not None:
        out_config["dtype"] = str(torch_dtype).removeprefix("torch.")
    sources = open_checkpoint(src)
    plan, skipped = plan_conversion(sources, config, torch_dtype)
    dst.mkdir(parents=True, exist_ok=True)
    write_safetensors(plan, dst, progress="convert")
    (dst / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
    for item in src.iterdir():  # tokenizer, generation config, chat template
        if item.is_file() and not _NOT_WEIGHTS.match(item.name):
            shutil.copy2(item, dst / item.name)
    rules = [
        "attention.wqkv -> q/k/v_proj: view [kv_heads, g + 2, head_dim, hidden], q = [:, :g], k = [:, g], v = [:, g + 1]",
        "attention.wo -> o_proj; feed_forward.w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj",
        "attention_norm -> input_layernorm; ffn_norm -> post_attention_layernorm",
        "tok_embeddings -> embed_tokens; output -> lm_head; norm -> norm",
        "config: bias -> attention_bias, rope_theta/rope_scaling -> rope_parameters, architectures -> LlamaForCausalLM",
    ]
    if skipped:
        rules.append(f"dropped derived buffers: {len(skipped)} rotary inv_freq")
    write_provenance(dst, tool="convert internlm2-to-llama", source=str(src), rules=rules,
                     dtype=out_config["dtype"])
    return dst
