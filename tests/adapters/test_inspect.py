"""`inspect` against hand computation and against the checkpoint's own element count."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from adapters.inspect_model import inspect_model, render
from server.cli import main

GIB = 2**30


def test_smollm2_by_hand_and_by_counting(demo_model):
    size = inspect_model(demo_model)
    # 49152 x 576 tied embeddings; per layer q 576x576, k/v 2x576x192, o 576x576,
    # MLP 3x576x1536, two norms 2x576; 30 layers; final norm 576.
    per_layer = 576 * 576 + 2 * 576 * 192 + 576 * 576 + 3 * 576 * 1536 + 2 * 576
    assert size.parameters == 49152 * 576 + 30 * per_layer + 576 == 134_515_008
    with safe_open(demo_model / "model.safetensors", "pt") as f:
        counted = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape()[1:] or [1])[0] for k in f.keys())
    assert size.parameters == counted
    assert size.weight_bytes["bf16"] == 2 * 134_515_008
    assert size.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2 == 23_040  # K and V, 3 KV heads of 64, bf16
    assert size.kv_bytes_at_max_context == 23_040 * 8192


def test_a_20b_like_bare_config(tmp_path):
    config = {"hidden_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 48, "num_key_value_heads": 8,
              "intermediate_size": 16384, "vocab_size": 92544, "max_position_embeddings": 32768,
              "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    size = inspect_model(path)
    per_layer = 6144 * 6144 * 2 + 2 * 6144 * 1024 + 3 * 6144 * 16384 + 2 * 6144
    assert size.parameters == 2 * 92544 * 6144 + 48 * per_layer + 6144 == 19_861_149_696
    assert size.weight_bytes["fp16"] / GIB == pytest.approx(37.0, abs=0.05)  # "20e9 x 2 bytes ~ 37 GiB"
    assert size.weight_bytes["int4"] == 19_861_149_696 / 2
    assert size.kv_bytes_per_token == 2 * 48 * 8 * 128 * 2 == 196_608  # GQA: 8 KV heads, not 48
    assert size.kv_bytes_at_max_context / GIB == 6.0


def test_cli_prints_the_arithmetic(demo_model, capsys):
    main(["inspect", str(demo_model)])
    out = capsys.readouterr().out
    assert "134,515,008" in out and "× 2 bytes ≈ 0.25 GiB" in out and "23,040 bytes per token" in out
    assert render(inspect_model(demo_model)) in out
