"""`trust_remote_code` only with the explicit `--trust-remote-code`, even for code inside
the model directory: without it a model that needs its own code is refused, with a
message naming the flag; with it, it loads (the candidate's loaders and the reference)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from server.engines import load_engine
from server.reference_app import ReferenceSettings
from server.serving.prompts import PromptRenderer
from server.settings import EngineSettings, ServeSettings
from shadow.factory import load_reference
from shadow.local_scorer import LocalScorer
from shadow.remote_code import RemoteCodeError, remote_code_allowed

MODELING = '''
from transformers import LlamaConfig, LlamaForCausalLM


class TinyConfig(LlamaConfig):
    model_type = "shadowserve_tiny"


class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''


@pytest.fixture(scope="module")
def custom_code_dir(demo_model: Path, tmp_path_factory) -> Path:
    """A tiny Llama whose config and model classes live in the directory's own
    modeling_tiny.py (auto_map), with a model type transformers does not know."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("custom-code")
    vocab = json.loads((demo_model / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    data.update(model_type="shadowserve_tiny", architectures=["TinyForCausalLM"],
                auto_map={"AutoConfig": "modeling_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (out / "config.json").write_text(json.dumps(data))
    (out / "modeling_tiny.py").write_text(MODELING)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(demo_model / name, out / name)
    return out


def test_flag_is_off_by_default():
    assert EngineSettings.model_fields["trust_remote_code"].default is False
    assert ReferenceSettings.model_fields["trust_remote_code"].default is False


def test_reference_with_local_code_is_refused_without_the_flag(custom_code_dir):
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        LocalScorer.load(custom_code_dir, device="cpu")
    scorer = LocalScorer.load(custom_code_dir, device="cpu", trust_remote_code=True)
    assert type(scorer._model).__name__ == "TinyForCausalLM"


def test_server_settings_carry_the_flag_to_the_reference_and_the_engine(custom_code_dir):
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):  # the server's first loader refuses
        PromptRenderer.load(custom_code_dir)
    renderer = PromptRenderer.load(custom_code_dir, trust_remote_code=True)
    off = ServeSettings(model=custom_code_dir, engine="transformers", shadow_rate=1.0, shadow_reference_device="cpu")
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        load_reference(off, custom_code_dir, renderer.tokenizer, trust_remote_code=off.trust_remote_code)
    with pytest.raises(RemoteCodeError, match="--trust-remote-code"):
        load_engine(off)
    on = off.model_copy(update={"trust_remote_code": True})
    assert load_reference(on, custom_code_dir, renderer.tokenizer, trust_remote_code=True).name == custom_code_dir.name
    engine = load_engine(on)
    assert engine.dtype == "float32"


def test_a_native_model_type_needs_no_flag(tmp_path, demo_model):
    # transformers loads a known model type natively and ignores a leftover auto_map.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}))
    assert remote_code_allowed(tmp_path, False) is False
    assert remote_code_allowed(demo_model, False) is False and remote_code_allowed(demo_model, True) is False
    # With the flag, still only code inside the directory.
    with pytest.raises(RemoteCodeError, match="not in the directory"):
        remote_code_allowed(tmp_path, True)


def test_a_tokenizer_auto_map_pointing_outside_is_refused_even_with_the_flag(custom_code_dir):
    config = json.loads((custom_code_dir / "tokenizer_config.json").read_text()) \
        if (custom_code_dir / "tokenizer_config.json").is_file() else {}
    config["auto_map"] = {"AutoTokenizer": ["someone/elsewhere--tokenization_evil.EvilTokenizer", None]}
    (custom_code_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RemoteCodeError, match="outside the directory"):
        PromptRenderer.load(custom_code_dir, trust_remote_code=True)
