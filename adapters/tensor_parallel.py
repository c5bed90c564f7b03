"""Whether a model splits evenly over N tensor-parallel ranks (pure arithmetic on its
config). Column-wise sharding cuts the query heads, the key/value heads (each rank keeps
whole KV heads with their query groups: InternLM2's packed `wqkv` is never split inside
a group), the MLP's intermediate width and the output head's vocabulary rows into N
equal parts; a part that is not whole is refused, naming which dimension.

Used by the tensor-parallel reference before it loads anything, and by `plan`.
"""

from __future__ import annotations


def dimensions(config: dict) -> dict[str, int]:
    """The dimensions tensor parallelism cuts, by the name an error gives them (a
    multimodal config's language model: its `text_config`)."""
    if "num_attention_heads" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    heads = int(config["num_attention_heads"])
    return {
        "attention heads (num_attention_heads)": heads,
        "KV heads (num_key_value_heads)": int(config.get("num_key_value_heads") or heads),
        "intermediate size (intermediate_size)": int(config["intermediate_size"]),
        "vocabulary (vocab_size)": int(config["vocab_size"]),
    }


def problems(config: dict, size: int) -> list[str]:
    """One line per dimension that `size` ranks do not divide (empty: it splits)."""
    if size < 1:
        return [f"tensor-parallel size {size}: it must be at least 1"]
    return [f"{name} {value} does not divide by tensor-parallel size {size}"
            for name, value in dimensions(config).items() if value % size]


def divisors(config: dict) -> list[int]:
    """Every tensor-parallel size the model splits over evenly (1 always)."""
    dims = dimensions(config).values()
    top = min(dims)
    return [n for n in range(1, top + 1) if all(d % n == 0 for d in dims)]
