"""adapters/model_dir.py: the one config reader, and the attention a reference must load with."""

from __future__ import annotations

import json

import pytest

from adapters.model_dir import ConfigError, exact_attention, read_config


def write(tmp_path, config) -> object:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("config, wanted", [
    ({"model_type": "gemma2", "attn_logit_softcapping": 50.0}, {"attn_implementation": "eager"}),
    ({"model_type": "gemma3", "text_config": {"attn_logit_softcapping": 30.0}}, {"attn_implementation": "eager"}),
    ({"model_type": "gemma2", "attn_logit_softcapping": None}, {}),  # soft-caps removed: sdpa is exact
    ({"model_type": "llama"}, {}),
])
def test_a_soft_capped_attention_is_loaded_eager(tmp_path, config, wanted):
    """transformers' sdpa drops Gemma-2's attention soft-cap without a word: the tiny
    Gemma-2's bf16 control read 2.39x the floor with it, 0.50x with eager attention."""
    assert exact_attention(write(tmp_path, config)) == wanted


def test_a_directory_without_a_config_leaves_the_loader_to_say_so(tmp_path):
    assert exact_attention(tmp_path) == {}
    with pytest.raises(ConfigError):
        read_config(tmp_path)
