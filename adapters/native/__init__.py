"""The project's own forwards for released checkpoint layouts that transformers has no
class for, so a reference in that layout runs without its remote code.

`NATIVE` maps a config's `model_type` to its loader. Each forward is written from the
model's definition, not from a converter's tensor mapping: a converter bug cannot sit on
both sides of a comparison.
"""

from __future__ import annotations

from pathlib import Path

from adapters.model_dir import is_model_dir, read_config
from adapters.native.internlm2 import load_internlm2

NATIVE = {"internlm2": load_internlm2}
DESCRIPTIONS = {"internlm2": "InternLM2, shadowserve's native forward of the released layout (its remote code is not run)"}


def native_type(model_dir: Path) -> str | None:
    """The model_type of `model_dir` when a native forward serves it, else None."""
    if not is_model_dir(model_dir):
        return None
    model_type = read_config(model_dir).get("model_type")
    return model_type if model_type in NATIVE else None
