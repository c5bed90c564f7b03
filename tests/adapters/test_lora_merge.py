"""Precision-aware LoRA merge on SmolLM2 with a seeded adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapters.lora_merge import merge_lora


@pytest.fixture(scope="module")
def lora_adapter(demo_model, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    base = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():  # a small, trained-looking update rather than peft's random-normal B
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.02)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def test_fp32_merge_matches_base_plus_adapter(demo_model, lora_adapter, tmp_path):
    report = merge_lora(demo_model, lora_adapter, tmp_path / "fp32", "fp32")
    assert report.max_abs_logit_diff < 1e-4
    assert report.warnings == ()
    provenance = json.loads((tmp_path / "fp32" / "provenance.json").read_text())
    assert provenance["probe"]["max_abs_logit_diff"] == report.max_abs_logit_diff


def test_the_adapter_matters(demo_model, lora_adapter, tmp_path):
    """Guard against a vacuous check: base alone is far from base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(demo_model).encode("The quick brown fox")])
    base = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, lora_adapter).eval()(ids).logits
    assert (plain - adapted).abs().max() > 0.1


def test_bf16_merge_drifts_and_warns(demo_model, lora_adapter, tmp_path, caplog):
    report = merge_lora(demo_model, lora_adapter, tmp_path / "bf16", "bf16")
    assert report.max_abs_logit_diff > report.tolerance
    # Merged in fp32 and cast once, the drift is bf16's own: near base + unmerged adapter in bf16.
    assert report.noise_floor > report.tolerance and report.max_abs_logit_diff < 2 * report.noise_floor
    assert any("drifts from base + adapter" in w for w in report.warnings)
    assert any("drifts" in r.message for r in caplog.records)
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert saved["dtype"] == "bfloat16"


def test_saving_in_another_dtype_than_served_warns(demo_model, lora_adapter, tmp_path):
    report = merge_lora(demo_model, lora_adapter, tmp_path / "mixed", "bf16", serving_dtype="fp16")
    assert any("saved in bfloat16 but served in float16" in w for w in report.warnings)
