"""The weight pass: every reference tensor beside its candidate counterpart, one pair at a
time, read memory-mapped by the checkpoint readers the converters use.

The reference is seen in the candidate's names:
- `identity`: the same names (Llama to Llama, a merge, a cast);
- `internlm2`: an InternLM2 reference through the converter's own rules (`plan_conversion`:
  wqkv split into q/k/v, the renames), so a candidate made by any InternLM2→Llama
  converter is judged against what the correct conversion gives;
- with an adapter: base + scale·B·A, computed in fp64 per tensor (the unmerged model's
  effective weight), and that update kept at hand for the low-rank test.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from adapters.diagnose.chunked import norm, row_chunks
from adapters.diagnose.forensics import Pair, TensorResult, classify
from adapters.errors import AdapterError
from adapters.model_dir import read_config
from adapters.tensor_io import TensorSource, open_checkpoint

_LAYER = re.compile(r"^(.*\blayers\.\d+\.)(.+)$")
_ROTARY = re.compile(r"self_attn\.([qk])_proj\.weight$")
_LAYER_NUMBER = re.compile(r"^(.*\blayers\.)(\d+)(\..+)$")
_NORM = re.compile(r"norm\.weight$")
_VOCAB = re.compile(r"(^|\.)(embed_tokens|lm_head|tok_embeddings)\.weight$|^output\.weight$")


@dataclass(frozen=True)
class Tensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    get: Callable[[], torch.Tensor]


# diagnose's own words for a path without a config.json
NOT_A_MODEL_DIR = "{path}: not a Hugging Face model directory (no config.json)"


def resolve_mapping(mapping: str, candidate: dict, reference: dict) -> str:
    """auto: `internlm2` for an InternLM2 reference beside a non-InternLM2 candidate, else identity."""
    ref_internlm2 = reference.get("model_type") == "internlm2"
    if mapping == "auto":
        return "internlm2" if ref_internlm2 and candidate.get("model_type") != "internlm2" else "identity"
    if mapping == "internlm2" and not ref_internlm2:
        raise AdapterError(f"--mapping internlm2: the reference's model_type is {reference.get('model_type')!r}, "
                           "not 'internlm2'")
    return mapping


def _sources(model_dir: Path) -> dict[str, TensorSource]:
    try:
        return open_checkpoint(model_dir)
    except FileNotFoundError as exc:
        raise AdapterError(str(exc)) from exc


def as_stored(sources: dict[str, TensorSource]) -> dict[str, Tensor]:
    """Every tensor under its own name (derived rotary buffers left out, as the converters do)."""
    return {name: Tensor(s.shape(name), s.dtype(name), lambda s=s, n=name: s.get(n))
            for name, s in sources.items() if not name.endswith("rotary_emb.inv_freq")}


def reference_view(model_dir: Path, mapping: str) -> dict[str, Tensor]:
    sources = _sources(model_dir)
    if mapping == "identity":
        return as_stored(sources)
    from adapters.internlm2 import plan_conversion

    plan, _ = plan_conversion(sources, read_config(model_dir, message=NOT_A_MODEL_DIR), None)
    return {item.name: Tensor(item.shape, item.dtype, item.produce) for item in plan}


@dataclass(frozen=True)
class Adapter:
    """A plain LoRA adapter: per base weight name, (A, B) loaders and the scale."""

    weights: dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]
    scale: float
    rank: int

    def delta(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """scale·B·A in fp32 or, with `base`, base + scale·B·A in base's dtype: summed in fp64
        a block of rows at a time (never a whole fp64 matrix)."""
        a, b = (f() for f in self.weights[name])
        a64 = a.to(torch.float64)
        out = torch.empty((b.shape[0], a.shape[1]), dtype=torch.float32 if base is None else base.dtype)
        for rows in row_chunks(b.shape[0], a.shape[1]):
            update = self.scale * (b[rows].to(torch.float64) @ a64)
            out[rows] = update if base is None else base[rows].to(torch.float64) + update
        return out


def load_adapter(adapter_dir: Path) -> Adapter:
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise AdapterError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)")
    config = json.loads(config_path.read_text())
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "fan_in_fan_out")
                   if config.get(k)]
    if config.get("peft_type", "LORA") != "LORA" or unsupported:
        raise AdapterError(f"{adapter_dir}: weight forensics reads plain LoRA adapters only "
                           f"(this one: {config.get('peft_type')}{', ' + ', '.join(unsupported) if unsupported else ''}); "
                           "run with --only config,activations")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    sources = _sources(adapter_dir)
    pairs: dict[str, dict[str, Callable]] = {}
    for key, source in sources.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$", key)
        if m is None:
            raise AdapterError(f"{adapter_dir}: {key}: not a LoRA A/B weight; weight forensics reads plain LoRA only")
        pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = lambda s=source, k=key: s.get(k)
    return Adapter({name: (p["A"], p["B"]) for name, p in pairs.items()}, scale, rank)


def with_adapter(view: dict[str, Tensor], adapter: Adapter) -> dict[str, Tensor]:
    missing = sorted(set(adapter.weights) - set(view))
    if missing:
        raise AdapterError(f"the adapter's {missing[0]} has no base weight in the reference")

    def merged(name: str, base: Tensor) -> Callable[[], torch.Tensor]:
        return lambda: adapter.delta(name, base.get())

    return {name: Tensor(t.shape, t.dtype, merged(name, t)) if name in adapter.weights else t for name, t in view.items()}


def _tied(view: dict[str, Tensor], config: dict) -> dict[str, Tensor]:
    """A tied output head is the embedding: name it so either side's lm_head has a counterpart."""
    embed = next((n for n in view if n.endswith("embed_tokens.weight")), None)
    if config.get("tie_word_embeddings") and embed and "lm_head.weight" not in view:
        return {**view, "lm_head.weight": view[embed]}
    return view


def _siblings(name: str, view: dict[str, Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    m = _LAYER.match(name)
    if m is None:
        return {}
    shape = view[name].shape
    return {other: view[other].get for other in view
            if other != name and other.startswith(m.group(1)) and view[other].shape == shape}


def _roles(view: dict[str, Tensor]) -> dict[tuple[str, str, tuple], list[str]]:
    """Layer tensors grouped by role and shape (the name with its layer number taken out)."""
    groups: dict[tuple[str, str, tuple], list[str]] = {}
    for name, t in view.items():
        if (m := _LAYER_NUMBER.match(name)) is not None:
            groups.setdefault((m.group(1), m.group(3), tuple(t.shape)), []).append(name)
    return groups


def _other_layers(name: str, view: dict[str, Tensor], roles: dict) -> dict[str, Callable[[], torch.Tensor]]:
    """The reference tensors of the same role and shape in the other layers."""
    m = _LAYER_NUMBER.match(name)
    if m is None:
        return {}
    return {other: view[other].get for other in roles[(m.group(1), m.group(3), tuple(view[name].shape))] if other != name}


def weight_pass(candidate: Path, reference: Path, mapping: str, adapter_dir: Path | None = None,
                device: str = "cpu", progress: bool = True) -> list[TensorResult]:
    cand_config = read_config(candidate, message=NOT_A_MODEL_DIR)
    ref_config = read_config(reference, message=NOT_A_MODEL_DIR)
    mapping = resolve_mapping(mapping, cand_config, ref_config)
    ref = reference_view(reference, mapping)
    adapter = None
    if adapter_dir is not None:
        adapter = load_adapter(adapter_dir)
        ref = with_adapter(ref, adapter)
    cand = as_stored(_sources(candidate))
    if "lm_head.weight" in ref or "lm_head.weight" in cand:
        ref, cand = _tied(ref, ref_config), _tied(cand, cand_config)
    heads = {"q": ref_config["num_attention_heads"],
             "k": ref_config.get("num_key_value_heads") or ref_config["num_attention_heads"]}
    norm_of = functools.cache(lambda name: norm(ref[name].get(), device))  # the cross-layer lookup's index
    roles = _roles(ref)
    results = []
    for name in tqdm(list(ref), desc="weights", unit="tensor", disable=not progress, leave=False):
        if name not in cand:
            results.append(TensorResult(name=name, kind="missing", shape=list(ref[name].shape),
                                        detail="in the reference, not in the candidate"))
            continue
        rotary = _ROTARY.search(name)
        pair = Pair(rotary_heads=heads[rotary.group(1)] if rotary else None, siblings=_siblings(name, ref),
                    adapter_delta=(lambda n=name: adapter.delta(n)) if adapter and name in adapter.weights else None,
                    adapter_rank=adapter.rank if adapter else None, other_layers=_other_layers(name, ref, roles),
                    norm_of=norm_of, norm_weight=bool(_NORM.search(name)), vocab_rows=bool(_VOCAB.search(name)),
                    device=device)
        results.append(classify(name, cand[name].get(), ref[name].get(), pair))
    for name in cand:
        if name not in ref:
            results.append(TensorResult(name=name, kind="extra", shape=list(cand[name].shape),
                                        detail="in the candidate, not in the reference"))
    return results


def adapter_targets(adapter_dir: Path | None) -> set[str]:
    return set(load_adapter(adapter_dir).weights) if adapter_dir is not None else set()
