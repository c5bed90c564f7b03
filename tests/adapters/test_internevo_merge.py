"""merge-tp on InternEvo training checkpoints built from real SmolLM2 weights, one shard
set per layout upstream accepts: merged, they equal InternEvo's rules written out
independently in the test (bit for bit); converted, they equal the original weights and
give the logits of InternEvo's own forward. A layout that cannot be read is refused; a
wrong declaration the tool cannot see through is caught by `verify`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.errors import AdapterError
from adapters.internevo import LayoutFlags
from adapters.internlm2 import convert_internlm2_to_llama
from adapters.tp_merge import merge_tp
from tests.adapters.conftest import TOKENIZER_FILES
from tests.adapters.internevo_shards import CASES, head_scale, internevo_forward, upstream_rules_merge
from tests.verify_cli import FAST, run_verify

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198, 1, 4093, 198, 6004]

def llama_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


@pytest.fixture(scope="module")
def original_logits(demo_model) -> torch.Tensor:
    return llama_logits(demo_model)


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_internevo_rules_written_out_independently(case, internevo_sets, smol_config):
    src, merged, _, _ = internevo_sets(case)
    spec, _ = CASES[case]
    want = upstream_rules_merge(src, smol_config, spec.adapt_hf, spec.embed_split_hidden, spec.norm_head)
    got = load_file(merged / "model.safetensors")
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("case", CASES)
def test_converted_weights_and_logits_are_the_originals(case, internevo_sets, smol_weights, smol_config, original_logits):
    _, _, llama, state = internevo_sets(case)
    spec, _ = CASES[case]
    embed = smol_weights["model.embed_tokens.weight"]
    head = torch.nn.functional.normalize(embed * head_scale(len(embed))[:, None], dim=-1) if spec.norm_head else embed
    got = load_file(llama / "model.safetensors")
    want = {**smol_weights, "lm_head.weight": head}
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    logits = llama_logits(llama)
    if not spec.norm_head:
        assert torch.equal(logits, original_logits)
    with torch.no_grad():
        internevo = internevo_forward(state, smol_config, PROMPT, spec.adapt_hf, spec.norm_head)
    assert (logits - internevo).abs().max().item() < 1e-4


def test_provenance_and_config_say_which_layout_was_applied_and_why(internevo_sets, smol_config):
    src, merged, _, _ = internevo_sets("native-interleaved-rotary")
    provenance = json.loads((merged / "provenance.json").read_text())
    assert provenance["layout"]["rotary_layout"] == {"value": "internevo", "reason": "model_config.pt has adapt_hf=False"}
    assert provenance["layout"]["embed_split"]["value"] == "hidden"
    assert provenance["layout"]["keys"] == "internevo"
    assert any(rule.startswith("rotary layout internevo") for rule in provenance["rules"])
    config = json.loads((merged / "config.json").read_text())  # written from model_config.pt
    assert config["intermediate_size"] == smol_config["intermediate_size"]
    assert config["num_key_value_heads"] == 3 and config["rope_theta"] == 100000.0
    assert "auto_map" not in config  # no remote code beside the shards to point at
    # Training state stays behind; the tokenizer comes along.
    assert sorted(p.name for p in merged.iterdir()) == sorted(
        ["config.json", "model.safetensors", "provenance.json", *TOKENIZER_FILES])
    amp = json.loads((internevo_sets("amp-vocab-split")[1] / "provenance.json").read_text())["layout"]
    assert amp["rotary_layout"]["reason"] == "declared with --rotary-layout hf"
    assert amp["embed_split"]["value"] == "vocab" and amp["keys"] == "internevo-amp"


def without_model_config(internevo_sets, case: str, dst: Path) -> Path:
    """The case's shards (hard links) with config.json in place of model_config.pt."""
    src, merged, _, _ = internevo_sets(case)
    dst.mkdir()
    for item in src.iterdir():
        if item.name != "model_config.pt":
            os.link(item, dst / item.name)
    (dst / "config.json").write_text((merged / "config.json").read_text())
    return dst


def test_without_model_config_the_rotary_layout_is_refused_not_guessed(internevo_sets, tmp_path):
    src = without_model_config(internevo_sets, "native-interleaved-rotary", tmp_path / "bare")
    with pytest.raises(AdapterError, match="cannot tell the rotary layout"):
        merge_tp(src, tmp_path / "out", LayoutFlags(norm_head=False))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from tests.verify_cli import CORPUS

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.mark.parametrize("case, wrong", [
    ("native-interleaved-rotary", LayoutFlags(rotary_layout="hf", norm_head=False)),
    ("norm-head", LayoutFlags(rotary_layout="internevo", norm_head=False)),
])
def test_a_wrong_declaration_merges_but_verify_fails_it(case, wrong, internevo_sets, demo_model, corpus, tmp_path):
    """Without model_config.pt the tool must trust the flags; the verdict catches the lie."""
    bare = without_model_config(internevo_sets, case, tmp_path / "bare")
    wrong_llama = convert_internlm2_to_llama(merge_tp(bare, tmp_path / "merged", wrong), tmp_path / "llama")
    reference = demo_model
    if CASES[case][0].norm_head:  # the reference is the model the norm-head shards really encode
        reference = internevo_sets(case)[2]
    run = run_verify(str(wrong_llama), str(reference), "--corpus", str(corpus), *FAST, "--json")
    assert run.returncode == 1, run.stderr[-3000:]
    assert json.loads(run.stdout)["verdict"]["status"] == "fail"


def test_the_right_merge_passes_verify(internevo_sets, demo_model, corpus):
    run = run_verify(str(internevo_sets("native-interleaved-rotary")[2]), str(demo_model), "--corpus", str(corpus), *FAST, "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["verdict"]["status"] == "pass" and report["candidate"]["identical"] == 8
