"""Findings: the three passes' results joined into a ranked list of causes. Pure.

Tensor results are grouped by what they say (kind and its figure: the scale, the block
order, the adapter multiple) across layers and modules, so thirty identical q_proj
results read as one line. Ranking: a named structural cause in the weights, then config
differences, then tensors that differ without a named cause, then rounding beyond the
dtype's own; the activation pass's first departure is joined to the top finding (or
stands alone when config and weights explain nothing).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from pydantic import BaseModel

from adapters.diagnose.activations import ActivationReport
from adapters.diagnose.configs import ConfigDifference
from adapters.diagnose.forensics import CLEAN, TensorResult, head_dim_ratio

PRECISION = ("rounding_beyond", "cast_twice")  # beyond one rounding, by precision alone: the drift judges it

STRUCTURAL = ("shape", "non_finite", "missing", "extra", "zeroed", "swapped", "other_layer", "rotary", "rows_moved", "permuted",
              "scaled", "offset", "low_rank")
_LAYER = re.compile(r"\blayers\.(\d+)\.")


@dataclass(frozen=True)
class Facts:
    """What the findings need to know of the reference."""

    layers: int
    head_dim: int
    adapter_targets: frozenset[str] = frozenset()


class Finding(BaseModel):
    source: str  # config | weights | activations
    kind: str
    summary: str
    tensors: list[str] = []


def _role(name: str) -> str:
    return _LAYER.sub("layers.*.", name).removeprefix("model.").removesuffix(".weight")


def _short(role: str) -> str:
    return role.removeprefix("layers.*.").removeprefix("self_attn.").removeprefix("mlp.")


def _layers(names: list[str], total: int) -> str:
    layers = sorted({int(m.group(1)) for n in names if (m := _LAYER.search(n))})
    if not layers:
        return ""
    if len(layers) == total:
        return f"all {total} layers"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(runs)


_ORDER = ("embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
          "input_layernorm", "post_attention_layernorm", "norm", "lm_head")


def _modules(names: list[str], layers: int) -> str:
    """'embed_tokens and q_proj, k_proj in all 30 layers' for a set of tensor names."""
    def ordered(roles):
        return sorted({_short(r) for r in roles}, key=lambda r: (_ORDER.index(r) if r in _ORDER else len(_ORDER), r))

    roles = {_role(n) for n in names}
    outside = ordered(r for r in roles if "layers.*." not in r)
    inside = ordered(r for r in roles if "layers.*." in r)
    text = ", ".join(outside)
    if inside:
        text += (" and " if outside else "") + ", ".join(inside) + f" in {_layers(names, layers)}"
    return text


def _layer_of(name: str) -> int:
    return int(_LAYER.search(name).group(1))


def _key(r: TensorResult):
    if r.kind == "scaled":
        return round(r.scale, 4)
    if r.kind == "offset":
        return float(f"{r.offset:.3g}")
    if r.kind == "other_layer":
        return _layer_of(r.other) - _layer_of(r.name)
    if r.kind == "rows_moved":
        return tuple(map(tuple, r.moves)), r.moved
    if r.kind == "permuted":
        return tuple(r.blocks)
    if r.kind == "swapped":
        return frozenset({_role(r.name), _role(r.other)})
    if r.kind == "low_rank":
        return r.rank, None if r.adapter_multiple is None else round(r.adapter_multiple, 2)
    if r.kind == "rotary":
        return r.detail
    if r.kind == "cast_twice":
        return r.through
    return None


def _what(kind: str, members: list[TensorResult], facts: Facts) -> str:
    sample = members[0]
    names = [m.name for m in members]
    roles = {_short(_role(n)) for n in names}
    if kind == "scaled":
        text = f"= {sample.scale:.4f} × reference"
        ratio = head_dim_ratio(sample.scale)
        if ratio:
            a, b = ratio
            text += f" (≈ √{a}/√{b} = {math.sqrt(a):.4g}/{math.sqrt(b):.4g}"
            attention = bool(roles & {"q_proj", "k_proj"})
            text += f": an attention-scale mismatch, 1/√{b} where 1/√{a} was meant)" if attention else ")"
        return text
    if kind == "swapped":
        pairs = sorted({(_short(_role(m.name)), _short(_role(m.other))) for m in members})
        both = len(pairs) == 2
        return (" and ".join(f"{a} = reference {b}" for a, b in pairs)
                + (f": {pairs[0][0].removesuffix('_proj')} and {pairs[0][1].removesuffix('_proj')} swapped" if both else ""))
    if kind == "permuted":
        parts = []
        for dim, what in ((0, "rows"), (1, "columns")):
            chosen = [m.name for m in members if m.block_dim == dim]
            if chosen:
                parts.append(f"{what} of {_modules(chosen, facts.layers)}")
        heads = all(m.shape[m.block_dim] // len(m.blocks) == facts.head_dim for m in members)
        cause = ("Heads in the wrong order (blocks of one head)" if heads
                 else "Shards concatenated in the wrong tensor-parallel rank order")
        return (f"{cause}: {' and '.join(parts)} are in {len(sample.blocks)} equal blocks in the order "
                f"{sample.blocks} (candidate block i holds reference block order[i])")
    if kind == "rotary":
        return sample.detail
    if kind == "offset":
        return "= " + sample.detail
    if kind == "rows_moved":
        what = sample.detail.replace("rows moved:", "token rows moved: ids")  # searched on vocabulary rows only
        if "←" in what:
            what += " (candidate row ← the reference row it holds)"
        return what + (": those ids read another token's embedding — rows reordered without the tokenizer, or a "
                       "tokenizer reordered without its rows")
    if kind == "low_rank":
        m = sample.adapter_multiple
        if m is None:
            return f"a rank-{sample.rank} difference (a LoRA-sized update merged where the reference has none?)"
        cause = ("the adapter merged twice" if abs(m - 1) < 0.05 else "the adapter not merged" if abs(m + 1) < 0.05
                 else f"the adapter merged at {1 + m:.3g}× its scale")
        only = " (the adapter's modules only)" if _adapter_only(names, facts.adapter_targets) else ""
        return f"a rank-{sample.rank} difference = {m:+.3f} × the adapter's update{only}: {cause}"
    if kind == "rounding_beyond":
        only = " — on the adapter's modules only" if _adapter_only(names, facts.adapter_targets) else ""
        off = sum(m.off_fraction for m in members) / len(members)
        return (f"rounding beyond {sample.compared_in}'s own{only}: {off:.1%} of elements off the single "
                f"{sample.compared_in} rounding of the reference (a single cast leaves 0): arithmetic done in "
                f"{sample.compared_in} (a merge in low precision?)")
    if kind == "cast_twice":
        off = sum(m.off_fraction for m in members) / len(members)
        flushed = sum(m.flushed or 0 for m in members)
        dtype, via = sample.compared_in, sample.through
        return (f"cast through {via}, then {dtype}: {off:.1%} of elements off the single {dtype} rounding of the "
                f"reference, each the {dtype} rounding of its {via} rounding"
                + (f" ({flushed} element(s) under {via}'s range flushed to 0)" if flushed else "")
                + ": a double cast (precision only; no arithmetic in low precision)")
    if kind == "differing":
        return f"differ without a named cause (relative error up to {max(m.rel_error for m in members):.3g})"
    return sample.detail


def _adapter_only(names: list[str], adapter_targets: frozenset[str]) -> bool:
    return bool(adapter_targets) and set(names) <= set(adapter_targets)


def _layer_shift(members: list[TensorResult], per_layer: int) -> str:
    """'layer 15 holds layer 14's weights (all 9 of its tensors)' for one layer shift."""
    shift = _layer_of(members[0].other) - _layer_of(members[0].name)
    layers = sorted({_layer_of(m.name) for m in members})
    roles = {_short(_role(m.name)) for m in members}
    whose = {-1: "its predecessor's", 1: "its successor's"}.get(shift, f"the weights of the layer {abs(shift)} "
                                                                     f"{'below' if shift < 0 else 'above'}")
    if len(layers) == 1:
        layer = layers[0]
        if len(roles) >= per_layer:
            text = f"layer {layer} holds layer {layer + shift}'s weights (all {per_layer} of its tensors)"
        else:
            text = f"layer {layer}'s {', '.join(sorted(roles))} hold{'s' if len(roles) == 1 else ''} layer {layer + shift}'s"
    else:
        text = (f"{_layers([m.name for m in members], 0)} hold {whose} weights "
                f"({', '.join(sorted(roles)) if len(roles) < per_layer else 'every tensor'})")
    return text + ": a layer renumbered in a merge (pipeline stages or checkpoint shards joined off by " \
                  f"{abs(shift)}); the reference's own weights for {'it' if len(layers) == 1 else 'them'} are not used"


def weight_findings(results: list[TensorResult], facts: Facts) -> list[Finding]:
    groups: dict = defaultdict(list)
    for r in results:
        if r.kind not in CLEAN:
            groups[(r.kind, _key(r))].append(r)
    per_layer = len({_role(r.name) for r in results if _LAYER.search(r.name)})  # tensors of one layer
    findings = []
    for (kind, _), members in groups.items():
        names = [m.name for m in members]
        if kind in ("missing", "extra", "shape", "non_finite") and len(members) <= 3:
            summary = "; ".join(f"{m.name}: {m.detail}" for m in members)
        elif kind == "permuted":
            summary = _what(kind, members, facts)
        elif kind == "other_layer":
            summary = _layer_shift(members, per_layer)
        else:
            what = _what(kind, members, facts)
            summary = f"{_modules(names, facts.layers)}{' ' if what.startswith('=') else ': '}{what}"
        findings.append(Finding(source="weights", kind=kind, summary=summary, tensors=names))
    rank = {k: i for i, k in enumerate(STRUCTURAL + ("differing",) + PRECISION)}
    return sorted(findings, key=lambda f: (rank[f.kind], -len(f.tensors)))


def tensor_groups(results: list[TensorResult], facts: Facts) -> list[tuple[str, str, str]]:
    """(module and layers, kind, detail) for the departing tensors, one row per module and
    finding rather than one per layer."""
    groups: dict = defaultdict(list)
    for r in results:
        if r.kind not in CLEAN:
            groups[(_role(r.name), r.kind, _key(r))].append(r)
    rows = []
    for (role, kind, _), members in groups.items():
        where = _layers([m.name for m in members], facts.layers)
        detail = members[0].detail
        if kind == "swapped":
            detail = f"equals reference {_role(members[0].other)}"
        if kind in ("differing", *PRECISION) and len(members) > 1:
            detail = (f"cast through {members[0].through}, then {members[0].compared_in}; " if kind == "cast_twice" else "")
            detail += (f"relative error {min(m.rel_error for m in members):.3g} to {max(m.rel_error for m in members):.3g}; "
                      f"{min(m.off_fraction for m in members):.1%} to {max(m.off_fraction for m in members):.1%} of "
                      f"elements off the single {members[0].compared_in} rounding")
        rows.append((f"{role}{' in ' + where if where else ''}", kind, detail))
    return rows


def settle_tied_head(config: list[ConfigDifference] | None,
                     weights: list[TensorResult] | None) -> list[ConfigDifference] | None:
    """`tie_word_embeddings` differs, but the output head that runs is the same on both sides:
    informational. The weight pass compares the candidate's head (its lm_head.weight, or its
    embedding where it ties) with the reference's (likewise); when that pair is identical,
    one rounding apart in the coarser dtype, or a cast through the other half-precision
    dtype, an untied head written out equal to the embedding (a common, correct export) is
    not a departure. Any other head result, or no weight pass, leaves the difference a
    finding."""
    head = next((r for r in weights or [] if r.name == "lm_head.weight" or r.name.endswith(".lm_head.weight")), None)
    if not config or head is None or head.kind not in (*CLEAN, "cast_twice"):
        return config
    how = {"identical": "bitwise", "rounding": f"up to one {head.compared_in} rounding",
           "cast_twice": f"up to a cast through {head.through}, then {head.compared_in}"}[head.kind]

    def settled(d: ConfigDifference) -> ConfigDifference:
        if d.field != "tie_word_embeddings" or d.file != "config.json" or not d.forward:
            return d
        what = ("the candidate writes its output head out as its own tensor (lm_head.weight), equal to the "
                "reference's tied embedding" if d.reference else
                "the candidate ties its output head to its embedding, equal to the reference's own lm_head.weight")
        return d.model_copy(update={"forward": False, "consequence": f"{what} {how}: the same output head"})

    return [settled(d) for d in config]


def config_findings(differences: list[ConfigDifference]) -> list[Finding]:
    """config.json's as `config …`; the tokenizer's, generation_config.json's and the chat
    template's under their own names (source `tokenizer`)."""
    return [Finding(source="config" if d.file == "config.json" else "tokenizer", kind=d.field,
                    summary=f"{'config ' if d.file == 'config.json' else ''}{d.field}: candidate {d.candidate} vs "
                            f"reference {d.reference}: {d.consequence}") for d in differences if d.forward]


def activation_sentence(report: ActivationReport) -> str | None:
    first = report.first_departure
    if first is None:
        return None
    text = f"first departure: {first.where}, {first.ratio:.3g}× the {report.serving_dtype} envelope"
    if report.also_off:
        text += f"; {', '.join(report.also_off)} also off"
    return text


def rank_findings(config: list[ConfigDifference] | None, weights: list[TensorResult] | None,
                  activations: ActivationReport | None, facts: Facts) -> list[Finding]:
    config = settle_tied_head(config, weights)
    found = weight_findings(weights or [], facts)
    structural = [f for f in found if f.kind in STRUCTURAL]
    rest = [f for f in found if f.kind not in STRUCTURAL]
    ranked = structural + config_findings(config or []) + rest
    sentence = activation_sentence(activations) if activations is not None else None
    if sentence is not None:
        if ranked and ranked[0].kind not in PRECISION:
            ranked[0] = ranked[0].model_copy(update={"summary": f"{ranked[0].summary}; {sentence}"})
        else:
            ranked.insert(0, Finding(source="activations", kind="departure", summary=(
                f"activations leave the envelope while config and weights agree — {sentence}: look at what runs the "
                "weights (modeling code, attention implementation, engine)")))
    return ranked
