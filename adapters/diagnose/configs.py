"""The config pass: every field that changes the forward pass, read from Llama-style and
InternLM2-style config.json files into one vocabulary, and the differences with what each
one does to the model. Pure (dicts in, differences out)."""

from __future__ import annotations

import math

from pydantic import BaseModel


class ConfigDifference(BaseModel):
    field: str
    candidate: object
    reference: object
    consequence: str
    forward: bool  # changes what the model does (a departure); False: informational
    file: str = "config.json"  # where the difference is: config.json, generation_config.json, tokenizer, chat template


def _rope(config: dict) -> dict:
    """rope_parameters (transformers 5) or rope_theta + rope_scaling (Llama 4.x, InternLM2)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", config.get("rope_theta", 10000.0))
    kind = params.pop("rope_type", None) or scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    extra = {**scaling, **params}
    return {"rope_theta": float(theta), "rope_type": kind, "rope_scaling_factor": extra.pop("factor", None),
            "rope_scaling_other": extra or None}


def _ids(value):
    return tuple(sorted(value)) if isinstance(value, list) else value


def normalise(config: dict) -> dict[str, object]:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    internlm2 = config.get("model_type") == "internlm2"
    scalar = config.get("query_pre_attn_scalar")
    return {
        **_rope(config),
        "partial_rotary_factor": float(config.get("partial_rotary_factor", 1.0)),
        "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "head_dim": head_dim,
        "query_pre_attn_scalar": scalar,
        "attention_scale": 1 / math.sqrt(scalar or head_dim),
        "attn_logit_softcapping": config.get("attn_logit_softcapping"),
        "final_logit_softcapping": config.get("final_logit_softcapping"),
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "hidden_size": config["hidden_size"],
        "intermediate_size": config.get("intermediate_size"),
        "num_hidden_layers": config["num_hidden_layers"],
        "sliding_window": config.get("sliding_window") if config.get("use_sliding_window", True) else None,
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "attention_bias": bool(config.get("bias", False) if internlm2 else
                               config.get("attention_bias", config.get("model_type") == "qwen2")),  # Qwen2's are built in
        "mlp_bias": bool(config.get("mlp_bias", False)),
        "hidden_act": config.get("hidden_act") or config.get("hidden_activation") or "silu",  # Gemma's name
        "vocab_size": config["vocab_size"],
        "bos_token_id": _ids(config.get("bos_token_id")),
        "eos_token_id": _ids(config.get("eos_token_id")),
        "pad_token_id": _ids(config.get("pad_token_id")),
        "max_position_embeddings": config.get("max_position_embeddings"),
    }


CONSEQUENCES = {
    "rope_theta": "rotary frequencies differ: every position after the first is rotated differently, so attention "
                  "drifts with distance",
    "rope_type": "a different rotary scaling scheme: positions are stretched differently (long contexts most)",
    "rope_scaling_factor": "rotary positions are stretched by a different factor",
    "rope_scaling_other": "other rotary scaling parameters differ",
    "partial_rotary_factor": "a different share of each head is rotated",
    "rms_norm_eps": "every RMSNorm divides by a different √(mean square + ε): small, but in every layer, "
                    "largest on low-norm activations",
    "head_dim": "a different head width: the attention scale 1/√head_dim differs and q/k/v split differently",
    "query_pre_attn_scalar": "attention logits are scaled by a different 1/√scalar",
    "attention_scale": "every attention logit is scaled differently: attention patterns sharper or flatter in "
                       "every layer",
    "attn_logit_softcapping": "attention logits are soft-capped (tanh) on one side only or at a different cap",
    "final_logit_softcapping": "output logits are soft-capped (tanh) on one side only or at a different cap",
    "num_attention_heads": "q and o split into a different number of heads",
    "num_key_value_heads": "GQA groups differ: query heads read the wrong key/value heads",
    "hidden_size": "a different architecture: the weights cannot correspond",
    "intermediate_size": "a different MLP width: the weights cannot correspond",
    "num_hidden_layers": "a different number of layers",
    "sliding_window": "attention sees a different window of past tokens on long inputs",
    "tie_word_embeddings": "the output head is the embedding on one side only, its own tensor on the other: a "
                           "different head unless that tensor equals the embedding (the weight pass compares them)",
    "attention_bias": "attention biases are added on one side only",
    "mlp_bias": "MLP biases are added on one side only",
    "hidden_act": "a different MLP nonlinearity",
    "vocab_size": "logits of a different width: ids past the smaller vocabulary are invalid",
    "bos_token_id": "a different beginning-of-sequence token: prompts are tokenized differently",
    "eos_token_id": "a different end-of-sequence token: generation stops elsewhere",
    "pad_token_id": "a different padding token (batched inputs, loss masks)",
    "max_position_embeddings": "a different maximum context (the forward pass within both is unchanged for the "
                               "default rotary scheme)",
}
INFORMATIONAL = {"max_position_embeddings", "pad_token_id"}
# Derived: reported only when its sources agree (else the source field says it).
DERIVED = {"attention_scale": ("head_dim", "query_pre_attn_scalar")}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def diff_configs(candidate: dict, reference: dict) -> list[ConfigDifference]:
    cand, ref = normalise(candidate), normalise(reference)
    out = []
    for field, consequence in CONSEQUENCES.items():
        if _same(cand[field], ref[field]):
            continue
        if field in DERIVED and any(not _same(cand[s], ref[s]) for s in DERIVED[field]):
            continue
        if field == "max_position_embeddings" and cand["rope_type"] != "default":
            consequence = "a different maximum context: scaled rotary schemes depend on it"
        out.append(ConfigDifference(field=field, candidate=cand[field], reference=ref[field], consequence=consequence,
                                    forward=field not in INFORMATIONAL or consequence != CONSEQUENCES[field]))
    return out
