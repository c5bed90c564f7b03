"""InternEvo training checkpoints: what they save, and the layout choices that change
what a merged tensor means.

InternEvo writes `model_tp{t}_pp{p}.pt` per rank plus `model_config.pt` (the training
config's `model` dict). Three choices in it decide how shards become one Hugging Face
InternLM2 checkpoint, the layout InternEvo's own `convert2hf_internlm2.py` writes:

- rotary layout (`adapt_hf`): with `adapt_hf=False` the attention rotates dims
  (2i, 2i+1) of every q and k head (it reorders them evens-then-odds inside the forward),
  Hugging Face rotates (i, i + d/2). Converting means applying that reorder to the q/k
  rows of `wqkv` once. Nothing in the tensors tells the two apart, so when neither
  `model_config.pt` nor a flag says, we refuse.
- embedding split: `Embedding1D` (used when `embed_split_hidden=True`, InternEvo's
  default, or without flash-attn) splits the hidden dim, flash-attn's vocab-parallel
  embedding (`tok_embeddings.word_embeddings.weight`) the vocab dim. The per-rank shape
  decides it; a declaration that contradicts the shape is refused.
- norm head (`norm_head=True`): the forward L2-normalises each output row, so the
  converted head stores normalised rows.

Key names come three ways: Hugging Face (`model.layers.*`, `model.tok_embeddings`,
`output.weight`), InternEvo's own (`layers.*`, `tok_embeddings`, `norm`, `output`) and
InternEvo behind its AMP wrapper (all of those under `model.`). All map to Hugging Face.
"""

from __future__ import annotations

import pickle
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from adapters.errors import AdapterError

RotaryLayout = Literal["hf", "internevo"]
EmbedSplit = Literal["vocab", "hidden"]
KeyScheme = Literal["hf", "internevo", "internevo-amp"]

_DERIVED = re.compile(r"\.inv_freq$")  # rotary buffers: recomputed, never merged (as upstream)
_CHUNKED = re.compile(r"^(model\.)?\d+\.")  # interleaved pipeline: one sub-model per chunk


@dataclass(frozen=True)
class Choice:
    value: str | bool | None
    reason: str


@dataclass(frozen=True)
class LayoutFlags:
    """What the user declared (None: not declared)."""

    rotary_layout: RotaryLayout | None = None
    embed_split: EmbedSplit | None = None
    norm_head: bool | None = None


@dataclass(frozen=True)
class Layout:
    keys: KeyScheme
    rotary: Choice
    embed_split: Choice
    norm_head: Choice

    def rules(self) -> list[str]:
        rotary = ("q/k rows of wqkv reordered per head from InternEvo's interleaved rotary layout (evens, then odds)"
                  if self.rotary.value == "internevo" else "wqkv kept as is (Hugging Face rotary layout)")
        head = "output rows L2-normalised (norm head)" if self.norm_head.value else "output kept as is (no norm head)"
        return [
            f"key names: {self.keys} -> Hugging Face InternLM2",
            f"rotary layout {self.rotary.value}: {rotary}; because {self.rotary.reason}",
            f"embedding split {self.embed_split.value}: because {self.embed_split.reason}",
            f"{head}; because {self.norm_head.reason}",
        ]

    def record(self) -> dict:
        return {"keys": self.keys, **{name: {"value": choice.value, "reason": choice.reason} for name, choice in
                                      (("rotary_layout", self.rotary), ("embed_split", self.embed_split),
                                       ("norm_head", self.norm_head))}}


# --- model_config.pt ---------------------------------------------------------------

class _ConfigUnpickler(pickle.Unpickler):
    """InternEvo pickles its `Config` (a dict subclass) with torch dtypes inside. Read it
    without InternEvo installed, and without executing anything: dicts and dtypes only."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("internlm.core.context.parallel_context", "Config"):
            return dict
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("collections", "OrderedDict"):
            from collections import OrderedDict

            return OrderedDict
        raise pickle.UnpicklingError(f"model_config.pt holds {module}.{name}; only a config dict is expected")


_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="shadowserve_restricted_pickle", Unpickler=_ConfigUnpickler,
    load=lambda f, **kw: _ConfigUnpickler(f, **kw).load())


def read_model_config(path: Path) -> dict:
    try:
        config = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except Exception as exc:  # a pickle that is not a plain config: say which and stop
        raise AdapterError(f"{path}: cannot read InternEvo's model config ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected InternEvo's model config dict, found {type(config).__name__}")
    if config.get("num_chunks", 1) != 1:
        raise AdapterError(f"{path}: num_chunks={config['num_chunks']} (interleaved pipeline): each stage holds "
                           "non-contiguous chunks of layers; merge-tp merges contiguous stages only")
    return config


def hf_config(model_config: dict, intermediate_size: int, max_position_embeddings: int | None) -> dict:
    """The Hugging Face InternLM2 config.json for an InternEvo model config (fields as
    InternEvo's convert2hf_internlm2.py maps them)."""
    if not model_config.get("no_bias", True):
        raise AdapterError("model_config.pt: no_bias=False (a biased model); the Llama layout has no q/k/v/o biases")
    missing = [k for k in ("num_layers", "hidden_size", "vocab_size", "num_attention_heads") if k not in model_config]
    if missing:
        raise AdapterError(f"model_config.pt lacks {missing}: cannot write config.json; put a Hugging Face "
                           "InternLM2 config.json beside the shards")
    heads = model_config["num_attention_heads"]
    return {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "vocab_size": model_config["vocab_size"], "hidden_size": model_config["hidden_size"],
        "intermediate_size": intermediate_size, "num_hidden_layers": model_config["num_layers"],
        "num_attention_heads": heads, "num_key_value_heads": model_config.get("num_kv_attention_heads", heads),
        "rms_norm_eps": model_config.get("layer_norm_epsilon", 1e-6), "rope_theta": model_config.get("rope_base", 10000),
        "rope_scaling": None, "bias": False, "hidden_act": "silu", "tie_word_embeddings": False,
        "max_position_embeddings": max_position_embeddings or model_config.get("max_position_embeddings", 4096),
        "torch_dtype": str(model_config.get("dtype", "torch.bfloat16")).removeprefix("torch."),
    }


def check_consistent(config: dict, model_config: dict) -> None:
    """config.json beside InternEvo shards must describe the same model as model_config.pt."""
    pairs = (("num_hidden_layers", "num_layers"), ("hidden_size", "hidden_size"), ("vocab_size", "vocab_size"),
             ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_kv_attention_heads"))
    for ours, theirs in pairs:
        if ours in config and theirs in model_config and config[ours] != model_config[theirs]:
            raise AdapterError(f"config.json says {ours}={config[ours]} but model_config.pt says "
                               f"{theirs}={model_config[theirs]}: they describe different models")


# --- key names -----------------------------------------------------------------------

def key_scheme(names: set[str]) -> KeyScheme:
    chunked = sorted(n for n in names if _CHUNKED.match(n))
    if chunked:
        raise AdapterError(f"{chunked[0]}: keys under a chunk index are InternEvo's interleaved pipeline "
                           "(num_chunks > 1); merge-tp merges contiguous stages only")
    if "model.output.weight" in names:
        return "internevo-amp"
    if any(n.startswith("layers.") for n in names) or {"tok_embeddings.weight", "norm.weight"} & names:
        return "internevo"
    return "hf"


def hf_name(name: str, scheme: KeyScheme) -> str | None:
    """The Hugging Face InternLM2 name of a shard key; None for derived buffers to drop."""
    if _DERIVED.search(name):
        return None
    if scheme == "internevo":
        name = "model." + name
    name = name.replace("tok_embeddings.word_embeddings.", "tok_embeddings.")
    return "output.weight" if name == "model.output.weight" else name


# --- the choices -------------------------------------------------------------------

def resolve_layout(scheme: KeyScheme, model_config: dict | None, flags: LayoutFlags,
                   embed_rank_shape: tuple[int, ...] | None, vocab: int, hidden: int, tp: int,
                   vocab_named: bool) -> Layout:
    return Layout(scheme, _rotary(scheme, model_config, flags),
                  _embed_split(model_config, flags, embed_rank_shape, vocab, hidden, tp, vocab_named),
                  _norm_head(scheme, model_config, flags))


def _contradicts(flag: str, field: str) -> AdapterError:
    return AdapterError(f"{flag} contradicts the checkpoint's model_config.pt ({field}): drop the flag, or check "
                        "that these shards are the ones that config describes")


def _rotary(scheme: KeyScheme, model_config: dict | None, flags: LayoutFlags) -> Choice:
    adapt_hf = (model_config or {}).get("adapt_hf")
    if adapt_hf is not None:
        value = "hf" if adapt_hf else "internevo"
        if flags.rotary_layout not in (None, value):
            raise _contradicts(f"--rotary-layout {flags.rotary_layout}", f"adapt_hf={adapt_hf}")
        return Choice(value, f"model_config.pt has adapt_hf={adapt_hf}")
    if flags.rotary_layout is not None:
        return Choice(flags.rotary_layout, f"declared with --rotary-layout {flags.rotary_layout}")
    if scheme == "hf":
        return Choice("hf", "Hugging Face key names (model.layers.*, output.weight): HF InternLM2 rotates (i, i + d/2)")
    where = ("model_config.pt has no adapt_hf (InternEvo's InternLM2 model defaults to True, its Llama model to "
             "False, and its converter assumes False)") if model_config is not None else "there is no model_config.pt"
    raise AdapterError(
        f"cannot tell the rotary layout of these InternEvo shards: {where}, and the tensors look the same either way. "
        "Pass --rotary-layout internevo if the model trained with adapt_hf=False (InternEvo's internlm2 configs), "
        "or --rotary-layout hf if it trained with adapt_hf=True. Guessing wrong writes wrong q/k weights")


def _norm_head(scheme: KeyScheme, model_config: dict | None, flags: LayoutFlags) -> Choice:
    flag = None if flags.norm_head is None else ("--norm-head" if flags.norm_head else "--no-norm-head")
    if model_config is not None:
        value = bool(model_config.get("norm_head", False))
        if flags.norm_head not in (None, value):
            raise _contradicts(flag, f"norm_head={value}")
        return Choice(value, f"model_config.pt has norm_head={value}" if "norm_head" in model_config else
                      "model_config.pt has no norm_head (InternEvo's default: False)")
    if flag is not None:
        return Choice(flags.norm_head, f"declared with {flag}")
    if scheme == "hf":
        return Choice(False, "Hugging Face InternLM2 has no norm head")
    raise AdapterError(
        "cannot tell whether these InternEvo shards use a norm head (norm_head=True normalises every output row "
        "in the forward): there is no model_config.pt. Pass --norm-head or --no-norm-head")


def _embed_split(model_config: dict | None, flags: LayoutFlags, shape: tuple[int, ...] | None, vocab: int,
                 hidden: int, tp: int, vocab_named: bool) -> Choice:
    if shape is None or tp == 1:
        return Choice("vocab" if vocab_named else "hidden", "one rank (or no embedding): nothing to concatenate")
    by_shape = {(vocab // tp, hidden): "vocab", (vocab, hidden // tp): "hidden"}.get(tuple(shape))
    stated, source = flags.embed_split, "--embed-split"
    if model_config is not None and "embed_split_hidden" in model_config:
        # Embedding1D (hidden split) is also what InternEvo builds without flash-attn.
        hidden_split = model_config["embed_split_hidden"] or not model_config.get("use_flash_attn", True)
        stated = "hidden" if hidden_split else "vocab"
        source = f"model_config.pt (embed_split_hidden={model_config['embed_split_hidden']})"
        if flags.embed_split not in (None, stated):
            raise _contradicts(f"--embed-split {flags.embed_split}", f"embed_split_hidden={model_config['embed_split_hidden']}")
    if by_shape is None:
        # Let the shape check explain the misfit (missing ranks, a wrong config).
        return Choice(stated or ("vocab" if vocab_named else "hidden"), "the shapes fit neither split; see below")
    if stated is not None and stated != by_shape:
        raise AdapterError(f"{source} says the embedding is split on the {stated} dim, but each rank holds "
                           f"{list(shape)} of [{vocab}, {hidden}]: a {by_shape} split across {tp} ranks")
    return Choice(by_shape, f"each rank holds {list(shape)} of [{vocab}, {hidden}]"
                            + (f", as {source} says" if stated else ""))


# --- the transforms ----------------------------------------------------------------

def unpermute_rotary(wqkv: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """InternEvo (adapt_hf=False) -> Hugging Face rotary layout: within every q and k head,
    rows (0, 2, 4, ..., 1, 3, 5, ...); v heads stay. Values move, none change (exact in any
    dtype), into one new tensor."""
    groups = heads // kv_heads
    head_dim = wqkv.shape[0] // (kv_heads * (groups + 2))
    rotated = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    rows = [start + (rotated if (start // head_dim) % (groups + 2) <= groups else torch.arange(head_dim))
            for start in range(0, wqkv.shape[0], head_dim)]  # per KV group: g query heads, k, then v
    return wqkv.index_select(0, torch.cat(rows))


def normalise_head(output: torch.Tensor) -> torch.Tensor:
    """norm_head: each output row over the hidden dim to unit L2 norm (as the forward
    does), computed in fp32 and stored in the shards' dtype."""
    return torch.nn.functional.normalize(output.float(), dim=-1).to(output.dtype)
