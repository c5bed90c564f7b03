"""Merge tensor-parallel (and pipeline-parallel) shards into one checkpoint.

Shards are files named `*tp{t}*pp{p}*.pt|.safetensors` (or `*tp{t}*` without pipeline
stages); the degrees are read from the names. Rules, by the weight's role:

- column-parallel (output features split): wqkv / q,k,v_proj, w1 / gate_proj,
  w3 / up_proj, embeddings, output / lm_head -> concatenate on dim 0
- row-parallel (input features split): wo / o_proj, w2 / down_proj -> dim 1
- replicated: norms -> checked equal across ranks, kept once
- pipeline stages renumber `model.layers.{i}` by the layers of the stages before.

Merged shapes are checked against config.json; a misfit names the tensor, the shapes,
the rule and the likely cause (e.g. one shard of a 16-way split loaded as unsplit).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from adapters.errors import AdapterError
from adapters.tensor_io import PlannedTensor, TensorSource, write_provenance, write_safetensors

COLUMN = ("attention.wqkv", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "feed_forward.w1",
          "feed_forward.w3", "mlp.gate_proj", "mlp.up_proj", "tok_embeddings", "embed_tokens", "output", "lm_head")
ROW = ("attention.wo", "self_attn.o_proj", "feed_forward.w2", "mlp.down_proj")
REPLICATED = ("attention_norm", "ffn_norm", "input_layernorm", "post_attention_layernorm", "norm")
_SHARD = re.compile(r"tp(\d+)(?:[_-]pp(\d+))?")
_LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")


def rule_for(name: str) -> tuple[str, int | None]:
    """('column', 0), ('row', 1) or ('replicated', None) for a weight or bias name."""
    stem, _, kind_of_param = name.rpartition(".")
    for kind, roles, dim in (("row", ROW, 1), ("column", COLUMN, 0), ("replicated", REPLICATED, None)):
        if any(stem == r or stem.endswith("." + r) for r in roles):
            if kind == "row" and kind_of_param == "bias":
                return "replicated", None  # added once, after the all-reduce
            return kind, dim
    raise AdapterError(f"{name}: no tensor-parallel rule for this weight (unknown key)")


def find_shards(src: Path) -> dict[tuple[int, int], Path]:
    shards = {}
    for path in sorted(src.iterdir()):
        if path.suffix in (".pt", ".safetensors") and (m := _SHARD.search(path.stem)):
            shards[(int(m.group(1)), int(m.group(2) or 0))] = path
    if not shards:
        raise AdapterError(f"{src}: no shard files named like model_tp0_pp0.pt or model_tp0_pp0.safetensors")
    tps = sorted({t for t, _ in shards})
    pps = sorted({p for _, p in shards})
    missing = [(t, p) for t in range(max(tps) + 1) for p in range(max(pps) + 1) if (t, p) not in shards]
    if missing:
        raise AdapterError(f"{src}: missing shards for (tp, pp) {missing}; found {sorted(shards)}")
    return shards


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Full (unsplit) shape per role, from config.json, for InternLM2 and Llama names."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv, inter, vocab = config.get("num_key_value_heads", heads), config["intermediate_size"], config["vocab_size"]
    d = config.get("head_dim") or h // heads
    return {
        "attention.wqkv": ((heads + 2 * kv) * d, h), "self_attn.q_proj": (heads * d, h),
        "self_attn.k_proj": (kv * d, h), "self_attn.v_proj": (kv * d, h),
        "attention.wo": (h, heads * d), "self_attn.o_proj": (h, heads * d),
        "feed_forward.w1": (inter, h), "feed_forward.w3": (inter, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
        "feed_forward.w2": (h, inter), "mlp.down_proj": (h, inter),
        "tok_embeddings": (vocab, h), "embed_tokens": (vocab, h), "output": (vocab, h), "lm_head": (vocab, h),
        "attention_norm": (h,), "ffn_norm": (h,), "input_layernorm": (h,), "post_attention_layernorm": (h,), "norm": (h,),
    }


def explain_misfit(name: str, got: tuple[int, ...], want: tuple[int, ...], rule: str, dim: int | None, tp: int) -> str:
    message = (f"{name}: merged shape {list(got)} does not fit the config's {list(want)} "
               f"(rule: {rule}-parallel, concatenated on dim {dim} across {tp} rank(s))")
    for axis, (g, w) in enumerate(zip(got, want)):
        if g != w and g and w % g == 0:
            k = w // g
            return (f"{message}. Dim {axis} is 1/{k} of the expected size: this looks like one shard of a {k}-way "
                    f"tensor-parallel split loaded as if unsplit ({list(got)} from checkpoint vs {list(want)} in model); "
                    f"pass all {k} rank files" + (" or check the split rule for this weight" if axis != dim else ""))
        if g != w and w and g % w == 0:
            return f"{message}. Dim {axis} is {g // w}x the expected size: ranks were concatenated on the wrong dim"
    return message


def _role(name: str) -> str:
    stem = _LAYER.sub(r"\3", name).removeprefix(".").removesuffix(".weight")
    return stem.removeprefix("model.")


def merge_tp(src: Path, dst: Path) -> Path:
    config = json.loads((src / "config.json").read_text())
    shards = find_shards(src)
    tp = max(t for t, _ in shards) + 1
    pp = max(p for _, p in shards) + 1
    sources = {key: TensorSource(path) for key, path in shards.items()}
    # Pipeline stages: layer offsets from the number of layers in earlier stages.
    offsets, offset = [], 0
    for p in range(pp):
        offsets.append(offset)
        layers = {int(m.group(2)) for n in sources[(0, p)].keys() if (m := _LAYER.match(n))}
        offset += len(layers)
    if offset != config["num_hidden_layers"]:
        raise AdapterError(f"{src}: the stages hold {offset} layers, config.json says {config['num_hidden_layers']}")
    shapes = expected_shapes(config)
    plan = []
    for p in range(pp):
        for name in sources[(0, p)].keys():
            rule, dim = rule_for(name)
            parts = [sources[(t, p)] for t in range(tp)]
            for t, part in enumerate(parts):
                if name not in part.keys():
                    raise AdapterError(f"{name}: present in rank 0 of stage {p} but missing from rank {t}")
            rank_shape = parts[0].shape(name)
            merged = list(rank_shape)
            if dim is not None:
                merged[dim] = sum(part.shape(name)[dim] for part in parts)
            global_name = _LAYER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offsets[p]}{m.group(3)}", name)
            want = shapes.get(_role(name))
            if want is not None and name.endswith(".weight") and tuple(merged) != want:
                raise AdapterError(explain_misfit(global_name, tuple(merged), want, rule, dim, tp))
            plan.append(PlannedTensor(global_name, tuple(merged), parts[0].dtype(name),
                                      lambda n=name, ps=parts, d=dim: _merge(n, ps, d)))
    dst.mkdir(parents=True, exist_ok=True)
    write_safetensors(plan, dst)
    for item in src.iterdir():
        if item.is_file() and not _SHARD.search(item.stem) and item.suffix not in (".pt", ".safetensors", ".bin"):
            shutil.copy2(item, dst / item.name)
    write_provenance(dst, tool="merge-tp", source=str(src), dtype=str(plan[0].dtype).removeprefix("torch."), rules=[
        f"detected tp={tp}, pp={pp} from file names",
        "column-parallel (wqkv, q/k/v_proj, w1/w3, gate/up_proj, embeddings, output/lm_head): concatenate dim 0",
        "row-parallel (wo/o_proj, w2/down_proj): concatenate dim 1",
        "norms: replicated, checked equal across ranks",
        f"pipeline stages renumbered with layer offsets {offsets}",
    ])
    return dst


def _merge(name: str, parts: list[TensorSource], dim: int | None) -> torch.Tensor:
    tensors = [part.get(name) for part in parts]
    if dim is not None:
        return torch.cat(tensors, dim=dim)
    for t, tensor in enumerate(tensors[1:], start=1):
        if not torch.equal(tensor, tensors[0]):
            raise AdapterError(f"{name}: replicated weight differs between rank 0 and rank {t}")
    return tensors[0]
