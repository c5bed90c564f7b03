"""Checkpoints whose own code (auto_map) fails the way InternLM2's released code does under
transformers 5, on real SmolLM2 weights (Llama layout, a model type transformers does not
know):

- `rope_type`: the configuration keeps `rope_scaling` as given and the model reads
  `rope_scaling["type"]`; transformers 5 rewrites a null `rope_scaling` into
  `{"rope_theta": ..., "rope_type": "default"}`, so the read raises KeyError: 'type'.
- `cached_rotary`: the rotary tables are computed in `__init__` as non-persistent buffers;
  transformers 5 builds the model on the meta device and never fills them in, so the model
  loads and runs and computes garbage.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CONFIGURATION = '''
from transformers import LlamaConfig


class BrokenConfig(LlamaConfig):
    model_type = "shadowserve_broken"

    def __init__(self, rope_scaling=None, **kwargs):
        super().__init__(**kwargs)
        self.rope_scaling = rope_scaling if rope_scaling is not None else getattr(self, "rope_scaling", None)
'''

MODELING = {
    "rope_type": '''
from transformers import LlamaForCausalLM

from .configuration_broken import BrokenConfig


class BrokenForCausalLM(LlamaForCausalLM):
    config_class = BrokenConfig

    def __init__(self, config):
        super().__init__(config)
        if config.rope_scaling is not None:
            self.scaling_type = config.rope_scaling["type"]  # as InternLM2's _init_rope does
''',
    "cached_rotary": '''
import torch
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_broken import BrokenConfig


class CachedRotary(nn.Module):
    """InternLM2's released rotary embedding: tables made once, in __init__."""

    def __init__(self, config):
        super().__init__()
        dim = config.head_dim
        base = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        t = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        emb = torch.cat((torch.outer(t, inv_freq),) * 2, dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self, x, position_ids):
        return self.cos_cached[position_ids].to(x.dtype), self.sin_cached[position_ids].to(x.dtype)


class BrokenForCausalLM(LlamaForCausalLM):
    config_class = BrokenConfig

    def __init__(self, config):
        super().__init__(config)
        self.model.rotary_emb = CachedRotary(config)
''',
}
FAILURES = tuple(MODELING)


def broken_remote_code_dir(demo_model: Path, out: Path, failure: str) -> Path:
    """A copy of the demo model (weights linked, not copied) whose classes are `failure`'s code."""
    out.mkdir(parents=True, exist_ok=True)
    os.link(demo_model / "model.safetensors", out / "model.safetensors") if not (out / "model.safetensors").exists() else None
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (demo_model / name).is_file():
            shutil.copy2(demo_model / name, out / name)
    config = json.loads((demo_model / "config.json").read_text())
    config.update(model_type="shadowserve_broken", architectures=["BrokenForCausalLM"], rope_scaling=None,
                  auto_map={"AutoConfig": "configuration_broken.BrokenConfig",
                            "AutoModelForCausalLM": "modeling_broken.BrokenForCausalLM"})
    (out / "config.json").write_text(json.dumps(config))
    (out / "configuration_broken.py").write_text(CONFIGURATION)
    (out / "modeling_broken.py").write_text(MODELING[failure])
    return out
