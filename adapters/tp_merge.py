"""Merge tensor-parallel (and pipeline-parallel) shards into one checkpoint.

Shards are files named `model_tp{t}_pp{p}.pt|.safetensors` (or `model_tp{t}` without
pipeline stages), as InternEvo writes them; the degrees are read from the names. Rules,
by the weight's role:

- column-parallel (output features split): wqkv / q,k,v_proj, w1 / gate_proj,
  w3 / up_proj, vocab-split embeddings, output / lm_head -> concatenate on dim 0
- row-parallel (input features split): wo / o_proj, w2 / down_proj, hidden-split
  embeddings -> dim 1
- replicated: norms -> checked equal across ranks, kept once
- pipeline stages renumber `model.layers.{i}` by the layers of the stages before.

InternEvo's own key names and layout choices (rotary layout, embedding split, norm
head) are read and applied by `adapters.internevo`; the output is a Hugging Face
InternLM2 checkpoint with a config.json. Merged shapes are checked against the config;
a misfit names the tensor, the shapes, the rule and the likely cause (e.g. one shard of
a 16-way split loaded as unsplit, or missing ranks).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from adapters import internevo
from adapters.errors import AdapterError
from adapters.internevo import LayoutFlags
from adapters.model_dir import is_model_dir, read_config
from adapters.tensor_io import PlannedTensor, TensorSource, write_provenance, write_safetensors

COLUMN = ("attention.wqkv", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "feed_forward.w1",
          "feed_forward.w3", "mlp.gate_proj", "mlp.up_proj", "tok_embeddings", "embed_tokens", "output", "lm_head")
ROW = ("attention.wo", "self_attn.o_proj", "feed_forward.w2", "mlp.down_proj")
REPLICATED = ("attention_norm", "ffn_norm", "input_layernorm", "post_attention_layernorm", "norm")
_SHARD = re.compile(r"^model_tp(\d+)(?:_wp(\d+))?(?:[_-]pp(\d+))?(?:_dp(\d+))?$")
_LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")
_EMBEDDING = "model.tok_embeddings.weight"
_INTERNLM2_AUTO_MAP = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                       "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                       "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
# Training state InternEvo saves beside the weights: never copied into a model directory.
_NOT_COPIED = re.compile(r"(\.md5|\.pt|\.pth|\.bin|\.safetensors)$|^topo_.*\.json$")


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
    """(tp rank, pp stage) -> file. Refuses layouts it cannot merge and names missing ranks."""
    shards, files = {}, sorted(p for p in src.iterdir() if p.suffix in (".pt", ".safetensors"))
    moe = [p.name for p in files if p.name.startswith("model_moe_")]
    if moe:
        raise AdapterError(f"{src}: {moe[0]}: mixture-of-experts shards; merge-tp merges dense models only")
    for path in files:
        if m := _SHARD.match(path.stem):
            tp_rank, wp_rank, pp_rank, dp_rank = m.groups()
            if dp_rank is not None:
                raise AdapterError(f"{path.name}: FSDP shards (_dp ranks) split parameters by data-parallel rank; "
                                   "merge-tp merges tensor- and pipeline-parallel shards only")
            if wp_rank is not None and int(wp_rank) > 0:
                raise AdapterError(f"{path.name}: weight-parallel (ISP) shards with wp > 1; merge-tp merges tensor- "
                                   "and pipeline-parallel shards only")
            shards[(int(tp_rank), int(pp_rank or 0))] = path
    if not shards:
        others = [p.name for p in files if "tp" in p.stem]
        raise AdapterError(f"{src}: no shard files named like model_tp0_pp0.pt or model_tp0_pp0.safetensors"
                           + (f" (ignored: {', '.join(others[:4])})" if others else ""))
    tp = max(t for t, _ in shards) + 1
    pp = max(p for _, p in shards) + 1
    suffix = next(iter(shards.values())).suffix
    problems = []
    for t in range(tp):
        absent = [p for p in range(pp) if (t, p) not in shards]
        if len(absent) == pp:
            problems.append(f"tensor-parallel rank {t} of {tp} is missing (no model_tp{t}_pp*{suffix})")
        else:
            problems += [f"tensor-parallel rank {t} of {tp} is missing from pipeline stage {p} of {pp} "
                         f"(model_tp{t}_pp{p}{suffix})" for p in absent]
    if problems:
        raise AdapterError(f"{src}: " + "; ".join(problems) + f"; found {[path.name for path in shards.values()]}")
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
        per_rank = g // tp if g and g % tp == 0 else 0
        if g != w and axis == dim and tp > 1 and per_rank and w % per_rank == 0 and w // per_rank > tp:
            k = w // per_rank
            return (f"{message}. Each rank holds {per_rank} of {w} on dim {axis}: a {k}-way split, but only {tp} "
                    f"rank files were found: tensor-parallel ranks {tp}..{k - 1} of {k} are missing")
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


def merge_tp(src: Path, dst: Path, flags: LayoutFlags = LayoutFlags(),
             max_position_embeddings: int | None = None) -> Path:
    """Merge the shards in SRC into a Hugging Face InternLM2 (or Llama) checkpoint in DST."""
    shards = find_shards(src)
    tp = max(t for t, _ in shards) + 1
    pp = max(p for _, p in shards) + 1
    model_config = internevo.read_model_config(src / "model_config.pt") if (src / "model_config.pt").is_file() else None
    sources = {key: TensorSource(path) for key, path in tqdm(sorted(shards.items()), desc="open shards", unit="file",
                                                              leave=False)}
    scheme = internevo.key_scheme({n for p in range(pp) for n in sources[(0, p)].keys()})
    # Per stage: (name in the shard, Hugging Face name), derived buffers dropped.
    names = [[(raw, hf) for raw in sources[(0, p)].keys() if (hf := internevo.hf_name(raw, scheme))] for p in range(pp)]
    offsets, offset = [], 0  # pipeline stages: layer offsets from the layers of earlier stages
    for p in range(pp):
        offsets.append(offset)
        offset += len({int(m.group(2)) for _, hf in names[p] if (m := _LAYER.match(hf))})
    given_config = is_model_dir(src)
    config = _config(src, given_config, model_config, sources, names, tp, max_position_embeddings)
    if offset != config["num_hidden_layers"]:
        raise AdapterError(f"{src}: the stages hold {offset} layers, the config says {config['num_hidden_layers']}")
    embedding = next(((p, raw) for p in range(pp) for raw, hf in names[p] if hf == _EMBEDDING), None)
    layout = internevo.resolve_layout(
        scheme, model_config, flags, sources[(0, embedding[0])].shape(embedding[1]) if embedding else None,
        config["vocab_size"], config["hidden_size"], tp, bool(embedding) and embedding[1].endswith("word_embeddings.weight"))
    if layout.rotary.value == "internevo" and not any(hf.endswith("attention.wqkv.weight") for stage in names
                                                      for _, hf in stage):
        raise AdapterError("--rotary-layout internevo re-orders q/k rows inside InternLM2's packed attention.wqkv, "
                           "and these shards have none; merge-tp cannot apply it to separate q/k projections")
    shapes = expected_shapes(config)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    plan = []
    for p in range(pp):
        parts = [sources[(t, p)] for t in range(tp)]
        for raw, hf in names[p]:
            rule, dim = rule_for(hf)
            if hf == _EMBEDDING and layout.embed_split.value == "hidden":
                rule, dim = "row", 1
            for t, part in enumerate(parts):
                if raw not in part.keys():
                    raise AdapterError(f"{raw}: present in rank 0 of stage {p} but missing from rank {t}")
            merged = list(parts[0].shape(raw))
            if dim is not None:
                merged[dim] = sum(part.shape(raw)[dim] for part in parts)
            global_name = _LAYER.sub(lambda m, p=p: f"{m.group(1)}{int(m.group(2)) + offsets[p]}{m.group(3)}", hf)
            want = shapes.get(_role(hf))
            if want is not None and hf.endswith(".weight") and tuple(merged) != want:
                raise AdapterError(explain_misfit(global_name, tuple(merged), want, rule, dim, tp))
            finish = None
            if hf.endswith("attention.wqkv.weight") and layout.rotary.value == "internevo":
                finish = lambda w: internevo.unpermute_rotary(w, heads, kv_heads)  # noqa: E731
            elif hf == "output.weight" and layout.norm_head.value:
                finish = internevo.normalise_head
            plan.append(PlannedTensor(global_name, tuple(merged), parts[0].dtype(raw),
                                      lambda n=raw, ps=parts, d=dim, f=finish: _merge(n, ps, d, f)))
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        write_safetensors(plan, dst, progress="merge-tp")
    except Exception:  # e.g. replicas that differ, found while writing: leave no half-written model behind
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    for item in src.iterdir():  # tokenizer, generation config; not training state
        if item.is_file() and not _NOT_COPIED.search(item.name) and item.name != "provenance.json":
            shutil.copy2(item, dst / item.name)
    if not given_config:
        if all((dst / f"{module}.py").is_file() for module in ("configuration_internlm2", "modeling_internlm2")):
            config["auto_map"] = _INTERNLM2_AUTO_MAP  # the release's remote code, copied beside the shards
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_provenance(dst, tool="merge-tp", source=str(src), dtype=str(plan[0].dtype).removeprefix("torch."), rules=[
        f"detected tp={tp}, pp={pp} from file names",
        "column-parallel (wqkv, q/k/v_proj, w1/w3, gate/up_proj, output/lm_head): concatenate dim 0",
        "row-parallel (wo/o_proj, w2/down_proj): concatenate dim 1",
        "norms: replicated, checked equal across ranks",
        f"pipeline stages renumbered with layer offsets {offsets}",
        *layout.rules(),
        "config.json: " + ("copied from the source" if given_config else
                           "written from model_config.pt (intermediate_size from the w2 shards"
                           + (", auto_map for the copied InternLM2 remote code)" if "auto_map" in config else ")")),
    ], extra={"layout": layout.record()})
    return dst


def _config(src: Path, given_config: bool, model_config: dict | None, sources: dict[tuple[int, int], TensorSource],
            names: list[list[tuple[str, str]]], tp: int, max_position_embeddings: int | None) -> dict:
    """config.json when the shards carry one (checked against model_config.pt), else one
    written from model_config.pt."""
    if given_config:
        config = read_config(src)
        if model_config is not None:
            internevo.check_consistent(config, model_config)
        return config
    if model_config is None:
        raise AdapterError(f"{src}: neither config.json nor InternEvo's model_config.pt: nothing says what model "
                           "these shards make; put the model's config.json beside them")
    w2 = next(((p, raw) for p, stage in enumerate(names) for raw, hf in stage if hf.endswith("feed_forward.w2.weight")),
              None)
    if w2 is None:
        raise AdapterError(f"{src}: no feed_forward.w2 weight to read the intermediate size from")
    return internevo.hf_config(model_config, sources[(0, w2[0])].shape(w2[1])[1] * tp, max_position_embeddings)


def _merge(name: str, parts: list[TensorSource], dim: int | None, finish=None) -> torch.Tensor:
    tensors = [part.get(name) for part in parts]
    if dim is not None:
        merged = torch.cat(tensors, dim=dim)
        return merged if finish is None else finish(merged)
    for t, tensor in enumerate(tensors[1:], start=1):
        if not torch.equal(tensor, tensors[0]):
            raise AdapterError(f"{name}: replicated weight differs between rank 0 and rank {t}")
    return tensors[0]
