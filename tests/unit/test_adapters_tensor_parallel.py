"""adapters/tensor_parallel.py (which sizes split) and the tensor-parallel reference's
settings and launch checks (server/reference_app.py, server/reference_ranks.py). The
ranks themselves run in tests/integration/test_tensor_parallel_reference.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import ValidationError

from adapters import tensor_parallel
from server.reference_app import ReferenceSettings
from server.reference_ranks import run_ranks

SMOL = {"num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152}


def test_the_sizes_a_model_splits_over():
    assert tensor_parallel.divisors(SMOL) == [1, 3]
    assert tensor_parallel.problems(SMOL, 3) == []
    two = tensor_parallel.problems(SMOL, 2)
    assert two == ["attention heads (num_attention_heads) 9 does not divide by tensor-parallel size 2",
                   "KV heads (num_key_value_heads) 3 does not divide by tensor-parallel size 2"]
    # KV heads default to the heads; a multimodal config is read through its text_config.
    assert tensor_parallel.problems({"text_config": {**SMOL, "num_key_value_heads": None}}, 9) == [
        "intermediate size (intermediate_size) 1536 does not divide by tensor-parallel size 9",
        "vocabulary (vocab_size) 49152 does not divide by tensor-parallel size 9"]
    llama70b = {"num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256}
    assert tensor_parallel.divisors(llama70b) == [1, 2, 4, 8]


def test_a_size_the_model_does_not_divide_by_is_refused_naming_which(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    with pytest.raises(ValidationError, match=r"does not split over 2 ranks: attention heads .* 9 .*; KV heads .* 3"):
        ReferenceSettings(model=tmp_path, tensor_parallel_size=2)
    assert ReferenceSettings(model=tmp_path, tensor_parallel_size=3).tensor_parallel_size == 3


@pytest.mark.parametrize("flags, named", [
    ({"adapter": "/a"}, "--adapter"),
    ({"lora_modules": ["a=/a"]}, "--lora-modules"),
    ({"allow_runtime_lora_updating": True}, "--allow-runtime-lora-updating"),
    ({"max_memory": "0=70GiB"}, "--max-memory"),
])
def test_what_cannot_be_sharded_is_refused(tmp_path, flags, named, monkeypatch):
    monkeypatch.setattr("adapters.lora_adapter.check_lora_adapter", lambda *a: None)
    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    with pytest.raises(ValidationError, match=f"--tensor-parallel-size 3 with {named}: peft's LoRA layers are not sharded"):
        ReferenceSettings(model=tmp_path, tensor_parallel_size=3, **flags)


def test_the_cli_refuses_before_launching_any_rank(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    done = subprocess.run([sys.executable, "-m", "server.cli", "reference", "--model", str(tmp_path),
                           "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "does not split over 2 ranks: attention heads (num_attention_heads) 9" in done.stderr
    assert "torch.distributed" not in done.stderr and "torchrun" not in done.stderr


def test_torchrun_with_another_number_of_ranks_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(SystemExit) as exit_:
        run_ranks(ReferenceSettings(model=tmp_path, tensor_parallel_size=3), serve=None)
    assert exit_.value.code == 2
    assert "torchrun started 6 ranks, but --tensor-parallel-size is 3" in capsys.readouterr().err


def test_a_config_without_the_dimensions_is_a_usage_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 8, "vocab_size": 100}))
    with pytest.raises(ValidationError, match="does not give the dimensions tensor parallelism cuts"):
        ReferenceSettings(model=tmp_path, tensor_parallel_size=2)


@pytest.mark.parametrize("model_type, planned", [("llama", True), ("diffllama", False)])
def test_a_class_whose_plan_covers_only_the_head_is_refused_before_loading(tmp_path, model_type, planned):
    """DiffLlama's only tensor-parallel rule is the output head's: it would load whole on every rank."""
    from shadow.scoring import ShadowReferenceError
    from shadow.tensor_parallel import _check_plan

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 576, **SMOL}))
    if planned:
        _check_plan(tmp_path, trust=False)
    else:
        with pytest.raises(ShadowReferenceError, match="no tensor-parallel plan for diffllama's layers"):
            _check_plan(tmp_path, trust=False)
