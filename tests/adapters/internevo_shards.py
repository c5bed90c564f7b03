"""InternEvo training shard sets built from Llama-layout weights (real SmolLM2, or tiny
random ones), and InternEvo's conversion rules written down independently of
`adapters/`: from InternEvo's model code and documented config fields (`adapt_hf`,
`embed_split_hidden`, `norm_head`, `model_tp{t}_pp{p}.pt`, `model_config.pt`), not by
importing upstream code or ours.

- Rotary: with adapt_hf=False InternEvo's attention reorders every q/k head's dims as
  `cat([x[..., ::2], x[..., 1::2]])` before a rotate-half rotary. Weights that behave like
  Hugging Face head rows h therefore store row 2j = h[j], row 2j+1 = h[d/2 + j].
- Embedding: `Embedding1D` (embed_split_hidden=True) holds [vocab, hidden/tp] per rank
  under `tok_embeddings.weight`; flash-attn's vocab-parallel embedding holds
  [vocab/tp, hidden] under `tok_embeddings.word_embeddings.weight`.
- norm_head=True: the forward uses each output row L2-normalised.
- Key names: InternEvo's own (`layers.N...`, `tok_embeddings`, `norm`, `output`), or all
  of those under `model.` (the AMP wrapper); rotary `inv_freq` buffers ride along.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.internevo import LayoutFlags

# Megatron-style split dim of each InternEvo weight (None: replicated on every rank).
SPLIT = {"attention.wqkv": 0, "attention.wo": 1, "feed_forward.w1": 0, "feed_forward.w3": 0, "feed_forward.w2": 1,
         "attention_norm": None, "ffn_norm": None, "norm": None, "output": 0}


@dataclass(frozen=True)
class Spec:
    tp: int = 3
    stages: tuple[int, ...] = (30,)  # layers per pipeline stage
    keys: str = "internevo"  # "internevo" (prefix-free) or "internevo-amp" (under "model.")
    adapt_hf: bool = False  # False: weights stored in InternEvo's interleaved rotary layout
    embed_split_hidden: bool = True
    norm_head: bool = False
    model_config: str | None = "pickle"  # "pickle" (InternEvo's Config class), "dict", or None
    model_config_extra: dict = field(default_factory=dict)
    training_files: bool = False  # optimizer / context / md5 / topo files beside the shards


def head_scale(vocab: int) -> torch.Tensor:
    """A norm-head model's stored output rows: seeded lengths in [0.25, 3.25)."""
    return torch.rand(vocab, generator=torch.Generator().manual_seed(0)) * 3 + 0.25


def interleave_heads(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF rotary rows -> InternEvo (adapt_hf=False) rows, per head: 2j <- j, 2j+1 <- d/2 + j."""
    heads, hidden = w.shape[0] // head_dim, w.shape[1]
    return w.view(heads, 2, head_dim // 2, hidden).transpose(1, 2).reshape(w.shape)


def internevo_state(weights: dict[str, torch.Tensor], config: dict, spec: Spec,
                    head_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The full (unsplit) model in InternEvo's own names and layout: the Hugging Face
    InternLM2 packing with q/k interleaved when adapt_hf=False and the `model.` prefix
    dropped. `head_scale` scales the output rows (a norm-head model's stored rows are not
    unit length)."""
    from tests.adapters.conftest import internlm2_state

    d = config["hidden_size"] // config["num_attention_heads"]
    if not spec.adapt_hf:
        weights = {name: interleave_heads(w, d) if name.endswith(("q_proj.weight", "k_proj.weight")) else w
                   for name, w in weights.items()}
    state = {name.removeprefix("model."): w for name, w in internlm2_state(weights, config).items()}
    if head_scale is not None:
        state["output.weight"] = state["output.weight"] * head_scale[:, None]
    return state


def model_config_of(config: dict, spec: Spec) -> dict:
    """The training config's `model` dict as InternEvo saves it in model_config.pt."""
    return {"num_chunks": 1, "checkpoint": False, "dtype": torch.float32, "embed_split_hidden": spec.embed_split_hidden,
            "num_layers": config["num_hidden_layers"], "hidden_size": config["hidden_size"],
            "vocab_size": config["vocab_size"], "embed_grad_scale": 1, "parallel_output": True,
            "num_attention_heads": config["num_attention_heads"], "num_kv_attention_heads": config["num_key_value_heads"],
            "mlp_ratio": config["intermediate_size"] / config["hidden_size"], "norm_type": "rmsnorm",
            "adapt_hf": spec.adapt_hf, "apply_post_layer_norm": False, "no_bias": True,
            "layer_norm_epsilon": config["rms_norm_eps"], "rope_base": config["rope_parameters"]["rope_theta"],
            "norm_head": spec.norm_head, "use_flash_attn": True, **spec.model_config_extra}


def save_internevo_config(value: dict, path: Path) -> None:
    """Pickle it as InternEvo does: an `internlm.core.context.parallel_context.Config`."""
    names = ["internlm", "internlm.core", "internlm.core.context", "internlm.core.context.parallel_context"]
    saved = {name: sys.modules.get(name) for name in names}
    module = types.ModuleType(names[-1])
    config_cls = type("Config", (dict,), {"__module__": names[-1]})
    module.Config = config_cls
    try:
        for name in names[:-1]:
            sys.modules[name] = types.ModuleType(name)
        sys.modules[names[-1]] = module
        torch.save(config_cls(value), path)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _role(name: str) -> str:
    parts = name.removesuffix(".weight").split(".")
    return ".".join(parts[2:]) if parts[0] == "layers" else parts[0]


def write_shards(state: dict[str, torch.Tensor], config: dict, spec: Spec, out: Path) -> Path:
    """model_tp{t}_pp{p}.pt files (and model_config.pt) as InternEvo's trainer writes them."""
    out.mkdir(parents=True, exist_ok=True)
    assert sum(spec.stages) == config["num_hidden_layers"]
    prefix = "model." if spec.keys == "internevo-amp" else ""
    first = 0
    for p, count in enumerate(spec.stages):
        ranks = [{} for _ in range(spec.tp)]
        for name, tensor in state.items():
            if name.startswith("layers."):
                i = int(name.split(".")[1])
                if not first <= i < first + count:
                    continue
                name = name.replace(f"layers.{i}.", f"layers.{i - first}.", 1)
            elif name == "tok_embeddings.weight":
                if p != 0:
                    continue
            elif p != len(spec.stages) - 1:  # norm and output live with the last stage
                continue
            if name == "tok_embeddings.weight":
                dim = 1 if spec.embed_split_hidden else 0
                if not spec.embed_split_hidden:
                    name = "tok_embeddings.word_embeddings.weight"
            else:
                dim = SPLIT[_role(name)]
            parts = [tensor] * spec.tp if dim is None else list(torch.chunk(tensor, spec.tp, dim=dim))
            for rank, part in zip(ranks, parts):
                rank[prefix + name] = part.clone()
        for i in range(count):  # persistent rotary buffers, dropped on conversion
            d = config["hidden_size"] // config["num_attention_heads"]
            for rank in ranks:
                rank[f"{prefix}layers.{i}.attention.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, d, 2) / d)
        for t, rank in enumerate(ranks):
            torch.save(rank, out / f"model_tp{t}_pp{p}.pt")
            if spec.training_files:
                (out / f"model_tp{t}_pp{p}.pt.md5").write_text("0" * 32 + "\n")
                (out / f"topo_tp{t}_pp{p}.json").write_text("{}")
                torch.save({"step": torch.zeros(1)}, out / f"optimizer_tp{t}_pp{p}_zo0.pt")
        first += count
    if spec.training_files:
        torch.save({"step": 10}, out / "context.pt")
    mc = model_config_of(config, spec)
    if spec.model_config == "pickle":
        save_internevo_config(mc, out / "model_config.pt")
    elif spec.model_config == "dict":
        torch.save(mc, out / "model_config.pt")
    return out


def upstream_rules_merge(src: Path, config: dict, adapt_hf: bool, embed_split_hidden: bool,
                         norm_head: bool) -> dict[str, torch.Tensor]:
    """InternEvo's conversion rules, written out here: strip the AMP `model.` prefix, shift
    stage layer indices, concatenate per the split table, un-interleave q/k when
    adapt_hf=False, normalise the head when norm_head=True. Hugging Face InternLM2 names out."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d, g = config["hidden_size"] // heads, heads // kv
    tp = 1 + max(int(p.stem.split("_")[1][2:]) for p in src.glob("model_tp*_pp*.pt"))
    pp = 1 + max(int(p.stem.split("_")[2][2:]) for p in src.glob("model_tp*_pp*.pt"))
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for t in range(tp):
        shift = 0
        for p in range(pp):
            top = -1
            for name, tensor in torch.load(src / f"model_tp{t}_pp{p}.pt").items():
                if name.endswith("inv_freq"):
                    continue
                name = name.removeprefix("model.")
                parts = name.split(".")
                if parts[0] == "layers":
                    top = max(top, int(parts[1]))
                    parts[1] = str(int(parts[1]) + shift)
                ranks[t][".".join(parts)] = tensor
            shift += top + 1
    out = {}
    for name in ranks[0]:
        role = _role(name)
        if role == "tok_embeddings" or name.startswith("tok_embeddings"):
            merged = torch.cat([r[name] for r in ranks], dim=1 if embed_split_hidden else 0)
            out["model.tok_embeddings.weight"] = merged
            continue
        dim = SPLIT[role]
        merged = ranks[0][name] if dim is None else torch.cat([r[name] for r in ranks], dim=dim)
        if role == "attention.wqkv" and not adapt_hf:
            blocks = list(merged.split(d))  # head blocks: per KV group g query heads, k, v
            for b, block in enumerate(blocks):
                if b % (g + 2) != g + 1:  # not a v head
                    blocks[b] = torch.cat([block[0::2], block[1::2]])
            merged = torch.cat(blocks)
        if role == "output" and norm_head:
            merged = merged / merged.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out[name if role == "output" else "model." + name] = merged
    return out


def internevo_forward(state: dict[str, torch.Tensor], config: dict, ids: list[int], adapt_hf: bool,
                      norm_head: bool) -> torch.Tensor:
    """InternEvo's forward on its own names and layout (fp32): with adapt_hf=False the q/k
    dims are reordered inside the attention, with norm_head the head rows are normalised."""
    import math

    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d, g, eps = h // heads, heads // kv, config["rms_norm_eps"]
    T = len(ids)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rotate_half(x):
        return torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)

    inv_freq = 1.0 / (config["rope_parameters"]["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos().float(), torch.cat([freqs, freqs], -1).sin().float()
    mask = torch.full((T, T), float("-inf")).triu(1)
    x = state["tok_embeddings.weight"][torch.tensor(ids)]
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        a = rms(x, state[p + "attention_norm.weight"])
        qkv = (a @ state[p + "attention.wqkv.weight"].T).view(T, kv, g + 2, d)
        q, k, v = qkv[:, :, :g].reshape(T, heads, d), qkv[:, :, g], qkv[:, :, g + 1]
        if not adapt_hf:
            q, k = torch.cat([q[..., ::2], q[..., 1::2]], -1), torch.cat([k[..., ::2], k[..., 1::2]], -1)
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        q, k = q * cos[:, None] + rotate_half(q) * sin[:, None], k * cos[:, None] + rotate_half(k) * sin[:, None]
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(d) + mask
        x = x + torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, heads * d) @ state[p + "attention.wo.weight"].T
        m = rms(x, state[p + "ffn_norm.weight"])
        x = x + (torch.nn.functional.silu(m @ state[p + "feed_forward.w1.weight"].T)
                 * (m @ state[p + "feed_forward.w3.weight"].T)) @ state[p + "feed_forward.w2.weight"].T
    head = state["output.weight"]
    if norm_head:
        head = torch.nn.functional.normalize(head, dim=-1)
    return rms(x, state["norm.weight"]) @ head.T


# name -> (how the shards are laid out, what the user declares on the command line)
CASES = {
    # InternEvo's internlm2_7B config: adapt_hf=False, embed_split_hidden=True; its own key
    # names; uneven TP=3 x PP=3 (7/13/10 layers); optimizer, context, md5 and topo files beside.
    "native-interleaved-rotary": (Spec(tp=3, stages=(7, 13, 10), training_files=True), LayoutFlags()),
    # Behind the AMP wrapper (`model.` everywhere, model.output.weight), flash-attn's
    # vocab-parallel embedding, adapt_hf=True, no model_config.pt: declared by flags.
    "amp-vocab-split": (Spec(tp=3, stages=(15, 15), keys="internevo-amp", adapt_hf=True, embed_split_hidden=False,
                             model_config=None), LayoutFlags(rotary_layout="hf", norm_head=False)),
    # norm_head=True (output rows stored unnormalised), model_config.pt as a plain dict.
    "norm-head": (Spec(tp=3, stages=(30,), norm_head=True, model_config="dict"), LayoutFlags()),
}
