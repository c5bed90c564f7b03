"""InternLM2 -> Llama on real SmolLM2 weights, checked against an independent InternLM2
forward that reads the packed layout the way upstream's modeling code does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters import internlm2
from adapters.errors import AdapterError
from adapters.internlm2 import convert_internlm2_to_llama
from adapters.tensor_io import sha256_file
from tests.adapters.internevo_shards import internevo_forward

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198, 1, 4093, 198, 6004]


def internlm2_forward(w: dict[str, torch.Tensor], config: dict, ids: list[int]) -> torch.Tensor:
    """Upstream InternLM2 semantics: wqkv rows are (h gs d) with gs = g + 2 (q..., k, v);
    the same forward as InternEvo's with adapt_hf=True, on Hugging Face names."""
    state = {name.removeprefix("model."): tensor for name, tensor in w.items()}
    config = {**config, "rope_parameters": {"rope_theta": config["rope_theta"]}}
    return internevo_forward(state, config, ids, adapt_hf=True, norm_head=False)


@pytest.fixture(scope="module")
def reference_logits(internlm2_dir) -> torch.Tensor:
    config = json.loads((internlm2_dir / "config.json").read_text())
    with torch.no_grad():
        return internlm2_forward(load_file(internlm2_dir / "model.safetensors"), config, PROMPT)


def llama_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


@pytest.fixture(scope="module")
def converted(internlm2_dir, tmp_path_factory) -> Path:
    return convert_internlm2_to_llama(internlm2_dir, tmp_path_factory.mktemp("llama"))


def test_converted_llama_matches_the_internlm2_forward(converted, reference_logits):
    diff = (llama_logits(converted) - reference_logits).abs().max().item()
    assert diff < 1e-4, f"max |Δlogit| {diff:.2e}"


def test_the_check_catches_a_wrong_split(internlm2_dir, reference_logits, tmp_path, monkeypatch):
    right = internlm2.split_wqkv
    monkeypatch.setattr(internlm2, "split_wqkv", lambda w, h, kv: (lambda q, k, v: (q, v, k))(*right(w, h, kv)))
    wrong = convert_internlm2_to_llama(internlm2_dir, tmp_path / "wrong")
    assert (llama_logits(wrong) - reference_logits).abs().max().item() > 1e-2


def test_config_tokenizer_and_provenance(converted, internlm2_dir):
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["attention_bias"] is False and config["num_key_value_heads"] == 3
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    assert "auto_map" not in config
    assert (converted / "tokenizer.json").read_bytes() == (internlm2_dir / "tokenizer.json").read_bytes()
    provenance = json.loads((converted / "provenance.json").read_text())
    assert provenance["source"] == str(internlm2_dir)
    assert provenance["sha256"]["model.safetensors"] == sha256_file(converted / "model.safetensors")
    assert any("wqkv" in rule for rule in provenance["rules"])


def test_rope_scaling_is_carried_over():
    config = internlm2.llama_config({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert config["rope_parameters"] == {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}


def test_biased_checkpoint_and_unknown_keys_are_refused(internlm2_dir, tmp_path):
    config = json.loads((internlm2_dir / "config.json").read_text())
    biased = tmp_path / "biased"
    biased.mkdir()
    (biased / "config.json").write_text(json.dumps({**config, "bias": True}))
    save_file({"model.norm.weight": torch.ones(4)}, biased / "model.safetensors")
    with pytest.raises(AdapterError, match="biased"):
        convert_internlm2_to_llama(biased, tmp_path / "out1")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(config))
    save_file({"model.layers.0.attention.rotary_mystery.weight": torch.ones(4)}, odd / "model.safetensors")
    with pytest.raises(AdapterError, match="unknown key"):
        convert_internlm2_to_llama(odd, tmp_path / "out2")


def test_pytorch_bin_checkpoints_convert_the_same(internlm2_dir, converted, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    torch.save(load_file(internlm2_dir / "model.safetensors"), src / "pytorch_model.bin")
    for item in internlm2_dir.iterdir():
        if item.suffix != ".safetensors":
            (src / item.name).write_bytes(item.read_bytes())
    out = load_file(convert_internlm2_to_llama(src, tmp_path / "llama") / "model.safetensors")
    want = load_file(converted / "model.safetensors")
    assert out.keys() == want.keys() and all(torch.equal(out[k], want[k]) for k in want)
