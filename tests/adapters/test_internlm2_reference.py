"""The InternLM2 original as the reference, with no remote code: the native forward of the
released layout (adapters/native) on an InternLM2 checkpoint packed by the tests' own rules
from real SmolLM2 weights (conftest.internlm2_state), checked against SmolLM2's Llama logits
computed by transformers; then `convert` + `verify` + `diagnose` against it as a user runs
them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.diagnose.run import diagnose
from adapters.errors import AdapterError
from adapters.native.internlm2 import load_internlm2
from shadow.local_scorer import LocalScorer
from shadow.scoring import ShadowReferenceError, vocab_fingerprint
from tests import candidates
from tests.adapters.conftest import padded
from tests.verify_cli import CORPUS, FAST, run_verify

PROMPTS = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198, 1, 4093, 198, 6004, 30, 4837, 314, 253],
    [1, 4093, 198, 1780, 1431, 314, 260, 3575],
]


@pytest.fixture(scope="module")
def llama(demo_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def native(internlm2_dir):
    return load_internlm2(internlm2_dir)


def llama_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_the_native_forward_reproduces_the_llama_logits(native, llama, left):
    ids, mask, spans = padded(PROMPTS, left)
    with torch.inference_mode():
        logits = native(input_ids=ids, attention_mask=mask).logits
    for row, (prompt, span) in enumerate(zip(PROMPTS, spans)):
        diff = (logits[row, span] - llama_logits(llama, prompt)).abs().max().item()
        assert diff <= 1e-4, f"row {row}: max |Δlogit| {diff:.2e}"


def test_logits_to_keep_selects_positions(native, llama):
    keep = torch.tensor([3, 7])
    with torch.inference_mode():
        kept = native(input_ids=torch.tensor([PROMPTS[0]]), logits_to_keep=keep).logits[0]
    assert (kept - llama_logits(llama, PROMPTS[0])[keep]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
def test_the_released_rope_scaling_types_match_transformers(internlm2_dir, demo_model, tmp_path, scaling):
    """`linear` and `dynamic` (NTK, past max_position_embeddings: 8 here, 19 tokens run)
    against transformers' Llama with the same scaling, on the same weights."""
    from transformers import AutoModelForCausalLM

    for name in ("model.safetensors",):
        (tmp_path / "internlm2").mkdir()
        (tmp_path / "internlm2" / name).symlink_to(internlm2_dir / name)
    config = json.loads((internlm2_dir / "config.json").read_text())
    config.update(rope_scaling=scaling, max_position_embeddings=8)
    (tmp_path / "internlm2" / "config.json").write_text(json.dumps(config))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "model.safetensors").symlink_to(demo_model / "model.safetensors")
    llama_config = json.loads((demo_model / "config.json").read_text())
    llama_config["rope_parameters"] = {**llama_config["rope_parameters"], "rope_type": scaling["type"],
                                       "factor": scaling["factor"]}
    llama_config["max_position_embeddings"] = 8
    (tmp_path / "llama" / "config.json").write_text(json.dumps(llama_config))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    model = load_internlm2(tmp_path / "internlm2")
    with torch.inference_mode():
        ours = model(input_ids=torch.tensor([PROMPTS[0]])).logits[0]
    plain = llama_logits(reference, PROMPTS[0])
    assert (ours - plain).abs().max().item() <= 1e-4
    unscaled = load_internlm2(internlm2_dir)
    with torch.inference_mode():  # and the scaling really changed something
        assert (unscaled(input_ids=torch.tensor([PROMPTS[0]])).logits[0] - ours).abs().max().item() > 1e-2


def test_the_local_scorer_runs_internlm2_natively_with_its_vocabulary(internlm2_dir, demo_model):
    from transformers import AutoTokenizer

    scorer = LocalScorer.load(internlm2_dir, device="cpu")
    assert scorer.loaded_as.startswith("InternLM2, shadowserve's native forward")
    assert type(scorer._model).__name__ == "InternLM2ForCausalLM"
    assert scorer.integrity_problems == []
    assert scorer.vocab == vocab_fingerprint(AutoTokenizer.from_pretrained(demo_model))


def test_a_checkpoint_not_in_the_released_layout_is_refused_by_name(internlm2_dir, smol_weights, smol_config, tmp_path):
    from tests.adapters.conftest import internlm2_state

    state = internlm2_state(smol_weights, smol_config)
    state.pop("model.layers.3.feed_forward.w3.weight")
    state["model.layers.3.feed_forward.w4.weight"] = state["model.layers.3.feed_forward.w1.weight"].clone()
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((internlm2_dir / "config.json").read_text())
    with pytest.raises(AdapterError, match=r"unknown tensors model\.layers\.3\.feed_forward\.w4\.weight; "
                                           r"missing model\.layers\.3\.feed_forward\.w3\.weight"):
        load_internlm2(tmp_path)
    with pytest.raises(ShadowReferenceError, match="not the released InternLM2 layout"):
        LocalScorer.load(tmp_path, device="cpu")


# --- convert, verify and diagnose against the original, as a user runs them -----------------

BROKEN = {  # conversion bug -> (how the converted checkpoint is broken, diagnose's first finding: kind, summary)
    "kv_swapped": (candidates.kv_swapped, "swapped", "k_proj, v_proj in all 30 layers: k_proj = reference v_proj "
                                                     "and v_proj = reference k_proj: k and v swapped"),
    "query_heads_group_major": (candidates.query_heads_group_major, "permuted",
                                "Heads in the wrong order (blocks of one head): rows of q_proj in all 30 layers"),
    "w1_w3_swapped": (candidates.gate_up_swapped, "swapped", "gate_proj, up_proj in all 30 layers: gate_proj = "
                                                             "reference up_proj and up_proj = reference gate_proj"),
}


@pytest.fixture(scope="module")
def converted(internlm2_dir, tmp_path_factory) -> Path:
    from adapters.internlm2 import convert_internlm2_to_llama

    return convert_internlm2_to_llama(internlm2_dir, tmp_path_factory.mktemp("converted"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


def test_verify_passes_the_converted_checkpoint_against_the_original(converted, internlm2_dir, corpus):
    run = run_verify(str(converted), str(internlm2_dir), "--corpus", str(corpus), *FAST, "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["verdict"]["status"] == "pass"
    assert report["candidate"]["identical"] == 8 and report["candidate"]["kl"]["mean"] < 1e-8
    check = report["reference_check"]
    assert check["trusted"] and abs(check["excess_nats"]) < 1e-4, check
    assert 1 < check["reference_perplexity"] < 100 and check["tokens"] > 100


@pytest.mark.parametrize("bug", BROKEN)
def test_a_broken_conversion_fails_verify_and_diagnose_names_it(bug, converted, internlm2_dir, corpus, tmp_path):
    make, kind, named = BROKEN[bug]
    candidate = make(converted, tmp_path / bug)
    run = run_verify(str(candidate), str(internlm2_dir), "--corpus", str(corpus), *FAST, "--json")
    assert run.returncode == 1, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["verdict"]["status"] == "fail"
    # A broken candidate never makes the reference look broken: the self-check passed.
    assert report["reference_check"]["trusted"] and report["reference_check"]["excess_nats"] < 0
    found = diagnose(candidate, internlm2_dir, progress=False)
    assert found.activations.reference_loaded_as.startswith("InternLM2, shadowserve's native forward")
    first = found.findings[0]
    assert found.departs and first.kind == kind and first.summary.startswith(named), first
    assert found.activations.first_departure.layer == 0
