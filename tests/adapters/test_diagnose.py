"""`diagnose` on real SmolLM2 weights: for each bug kind the first finding names the cause
(and the figure that proves it); precision-only controls come out clean. Candidates are
built here from the demo model (tests/candidates.py); the InternLM2 cases from the
InternLM2-layout fixture (conftest)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.diagnose.run import diagnose
from tests import candidates

LAYERS = 30
ADAPTER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("diagnose")


@pytest.fixture(scope="module")
def adapter(demo_model, root) -> Path:
    return candidates.lora_adapter(demo_model, root / "adapter")


MAKERS = {
    "rope_theta": lambda demo, adapter, out: candidates.rope_theta(demo, out),
    "norm_eps": lambda demo, adapter, out: candidates.norm_eps(demo, out),
    "attention_scale": lambda demo, adapter, out: candidates.attention_scale(demo, out),
    "kv_swapped": lambda demo, adapter, out: candidates.kv_swapped(demo, out),
    "tp_rank_order": lambda demo, adapter, out: candidates.tp_rank_order(demo, out),
    "rotary_layout": lambda demo, adapter, out: candidates.rotary_layout(demo, out),
    "lora_twice": lambda demo, adapter, out: candidates.lora_merged(demo, adapter, out, times=2),
    "lora_half_scale": lambda demo, adapter, out: candidates.lora_merged(demo, adapter, out, lora_alpha=8),
    "lora_bf16_merge": candidates.lora_bf16_merge,
    "layer_renumbered": lambda demo, adapter, out: candidates.layer_renumbered(demo, out),
    "norm_minus_one": lambda demo, adapter, out: candidates.norm_minus_one(demo, out),
    "embedding_rows_exchanged": lambda demo, adapter, out: candidates.embedding_rows_exchanged(demo, out),
    "wrong_generation_eos": lambda demo, adapter, out: candidates.wrong_generation_eos(demo, out),
    "template_without_system": lambda demo, adapter, out: candidates.template_without_system(demo, out),
    "bf16": lambda demo, adapter, out: candidates.cast_weights(demo, out, torch.bfloat16),
    "fp16": lambda demo, adapter, out: candidates.cast_weights(demo, out, torch.float16),
}
WITH_ADAPTER = ("lora_twice", "lora_half_scale", "lora_bf16_merge")


@pytest.fixture(scope="module")
def run(demo_model, adapter, root):
    """diagnose(candidate name, passes) -> report, each built and run once."""
    cache = {}

    def go(name: str, only=("config", "weights", "activations")):
        key = (name, tuple(only))
        if key not in cache:
            path = root / name
            if not path.exists():
                MAKERS[name](demo_model, adapter, path)
            cache[key] = diagnose(path, demo_model, adapter=adapter if name in WITH_ADAPTER else None,
                                  only=tuple(only), device="cpu", progress=False)
        return cache[key]

    return go


def kinds(report, module: str) -> set[str]:
    return {r.kind for r in report.weights if r.name.endswith(f"{module}.weight")}


def test_rope_theta_is_a_config_finding_that_departs_at_layer_0_attention(run):
    report = run("rope_theta")
    first = report.findings[0]
    assert (first.source, first.kind) == ("config", "rope_theta")
    assert "candidate 10000.0 vs reference 100000.0" in first.summary
    assert "first departure: layer 0, self-attention output" in first.summary
    assert set(report.weight_counts) == {"identical"}  # the weights are the reference's own
    assert report.departs


def test_norm_epsilon_is_named_from_the_config(run):
    report = run("norm_eps", ("config", "weights"))
    first = report.findings[0]
    assert (first.source, first.kind) == ("config", "rms_norm_eps")
    assert "candidate 1e-06 vs reference 9.99" in first.summary and "RMSNorm" in first.summary
    assert len(report.findings) == 1 and report.departs


def test_attention_scale_names_the_constant_the_ratio_and_layer_0_attention(run, demo_model):
    report = run("attention_scale")
    first = report.findings[0]
    assert first.source == "weights" and first.kind == "scaled"
    assert first.summary.startswith("q_proj in all 30 layers = 1.0695 × reference (≈ √256/√224 = 16/14.97: "
                                    "an attention-scale mismatch")
    assert "first departure: layer 0, self-attention output" in first.summary
    scaled = [r for r in report.weights if r.kind == "scaled"]
    assert len(scaled) == LAYERS and all(r.name.endswith("q_proj.weight") for r in scaled)
    assert all(abs(r.scale - 16 / 14.96) < 1e-6 for r in scaled)  # the constant the candidate was built with
    assert report.weight_counts == {"identical": 272 - LAYERS, "scaled": LAYERS}
    first_site = report.activations.first_departure
    assert (first_site.layer, first_site.site) == (0, "attention") and first_site.ratio > 4


def test_kv_swap_says_which_tensor_equals_which(run):
    report = run("kv_swapped", ("weights",))
    first = report.findings[0]
    assert first.kind == "swapped"
    assert first.summary == ("k_proj, v_proj in all 30 layers: k_proj = reference v_proj and v_proj = reference "
                             "k_proj: k and v swapped")
    for r in report.weights:
        if r.kind == "swapped":
            assert r.other == r.name.replace("k_proj", "@").replace("v_proj", "k_proj").replace("@", "v_proj")
    assert report.weight_counts["swapped"] == 2 * LAYERS


def test_tp_rank_order_reports_the_block_order(run):
    report = run("tp_rank_order", ("weights",))
    first = report.findings[0]
    assert first.kind == "permuted" and first.summary.startswith(
        "Shards concatenated in the wrong tensor-parallel rank order")
    o_proj = [r for r in report.weights if r.name.endswith("o_proj.weight")]
    assert all(r.kind == "permuted" and r.blocks == [1, 0, 2] and r.block_dim == 1 for r in o_proj)
    assert "columns of o_proj, down_proj in all 30 layers" in first.summary
    assert "in 3 equal blocks in the order [1, 0, 2]" in first.summary
    assert kinds(report, "input_layernorm") == {"identical"}  # replicated: not split, not permuted


def test_interleaved_rotary_layout_is_named(run):
    report = run("rotary_layout", ("weights",))
    first = report.findings[0]
    assert first.kind == "rotary" and first.summary.startswith("q_proj, k_proj in all 30 layers")
    assert "interleaved (Meta) rotary layout" in first.summary
    assert kinds(report, "v_proj") == {"identical"}


@pytest.mark.parametrize("name, multiple, cause", [
    ("lora_twice", 1.0, "the adapter merged twice"),
    ("lora_half_scale", -0.5, "the adapter merged at 0.5× its scale"),
])
def test_a_lora_merged_wrongly_is_a_low_rank_difference_on_its_modules_only(run, name, multiple, cause):
    report = run(name, ("weights",))
    first = report.findings[0]
    assert first.kind == "low_rank" and cause in first.summary
    assert "a rank-8 difference" in first.summary and "(the adapter's modules only)" in first.summary
    low = [r for r in report.weights if r.kind == "low_rank"]
    assert len(low) == len(ADAPTER_MODULES) * LAYERS
    assert {r.name.split(".")[-2] for r in low} == set(ADAPTER_MODULES)
    assert all(r.rank == 8 and abs(r.adapter_multiple - multiple) < 1e-3 for r in low)
    assert {r.kind for r in report.weights if r not in low} == {"identical"}


def test_a_lora_merged_in_bf16_is_rounding_beyond_bf16_on_its_modules_only(run):
    """Diagnose reports the merge's extra rounding; the activations stay inside the bf16
    envelope, which is the verdict's view too (this candidate passes it when served in bf16)."""
    report = run("lora_bf16_merge")
    first = report.findings[0]
    assert first.kind == "rounding_beyond"
    assert "rounding beyond bfloat16's own — on the adapter's modules only" in first.summary
    beyond = [r for r in report.weights if r.kind == "rounding_beyond"]
    assert {r.name.split(".")[-2] for r in beyond} == set(ADAPTER_MODULES) and len(beyond) == 7 * LAYERS
    assert all(r.off_fraction > 0.1 for r in beyond)  # a single cast leaves none off
    assert {r.kind for r in report.weights if r not in beyond} == {"rounding"}
    assert report.activations.first_departure is None
    assert len(report.findings) == 1


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_precision_controls_are_clean(run, name):
    report = run(name)
    assert report.weight_counts == {"rounding": 272}
    assert not report.departs and report.findings == [] and report.config == []
    assert report.activations.first_departure is None
    assert report.activations.serving_dtype == {"bf16": "bfloat16", "fp16": "float16"}[name]
    assert max(s.ratio for s in report.activations.sites) < 4


def test_the_activation_pass_agrees_with_transformers_hidden_states(run, demo_model, root):
    """The residual-stream errors come from hooks; recompute them from transformers' own
    output_hidden_states (no hooks) for the attention-scale candidate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.diagnose.activations import PROMPTS

    report = run("attention_scale")
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in (("ref", demo_model), ("cand", root / "attention_scale"))}
    num = torch.zeros(LAYERS - 1, dtype=torch.float64)
    den = torch.zeros(LAYERS - 1, dtype=torch.float64)
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        with torch.no_grad():
            ref, cand = (models[m](ids, output_hidden_states=True).hidden_states for m in ("ref", "cand"))
        for layer in range(LAYERS - 1):  # hidden_states[layer + 1] is layer's output (the last is normed)
            num[layer] += (cand[layer + 1].double() - ref[layer + 1].double()).square().sum()
            den[layer] += ref[layer + 1].double().square().sum()
    ours = {s.layer: s.candidate for s in report.activations.sites if s.site == "residual"}
    for layer in range(LAYERS - 1):
        assert math.isclose(ours[layer], float((num[layer] / den[layer]).sqrt()), rel_tol=1e-4), layer


def test_internlm2_conversion_by_our_converter_is_clean_and_a_broken_one_is_named(internlm2_dir, smol_config, tmp_path):
    """Mapping internlm2: the weight pass splits the reference's wqkv by the converter's
    rules; the activation pass runs the native InternLM2 forward. Our own conversion comes
    out identical; one that takes the query heads of a GQA group in the wrong order
    (group-major instead of head-major) is named as a head-order bug."""
    from adapters.internlm2 import convert_internlm2_to_llama

    good = convert_internlm2_to_llama(internlm2_dir, tmp_path / "good")
    report = diagnose(good, internlm2_dir, only=("config", "weights"), progress=False)
    assert report.mapping == "internlm2"
    assert report.weight_counts == {"identical": 273} and not report.departs

    broken = tmp_path / "broken"
    broken.mkdir()
    for item in good.iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(good / "model.safetensors")
    kv, g = smol_config["num_key_value_heads"], smol_config["num_attention_heads"] // smol_config["num_key_value_heads"]
    for name in [n for n in weights if n.endswith("q_proj.weight")]:
        q = weights[name]
        weights[name] = q.view(kv, g, -1, q.shape[1]).transpose(0, 1).reshape(q.shape).contiguous()
    save_file(weights, broken / "model.safetensors")
    report = diagnose(broken, internlm2_dir, mapping="internlm2", progress=False)
    assert report.activations.reference_loaded_as.startswith("InternLM2, shadowserve's native forward")
    assert (report.activations.first_departure.layer, report.activations.first_departure.site) == (0, "attention")
    first = report.findings[0]
    assert first.kind == "permuted" and first.summary.startswith("Heads in the wrong order (blocks of one head): "
                                                                 "rows of q_proj in all 30 layers")
    assert "in 9 equal blocks in the order [0, 3, 6, 1, 4, 7, 2, 5, 8]" in first.summary
    assert report.weight_counts == {"identical": 273 - LAYERS, "permuted": LAYERS}


def test_a_layer_renumbered_in_a_merge_names_both_layers(run):
    report = run("layer_renumbered", ("config", "weights"))
    first = report.findings[0]
    assert first.kind == "other_layer" and first.summary.startswith(
        "layer 15 holds layer 14's weights (all 9 of its tensors): a layer renumbered in a merge")
    moved = [r for r in report.weights if r.kind == "other_layer"]
    assert len(moved) == 9 and all(r.name.startswith("model.layers.15.") and
                                   r.other == r.name.replace("layers.15.", "layers.14.") for r in moved)
    assert report.weight_counts == {"identical": 263, "other_layer": 9} and len(report.findings) == 1


def test_a_norm_in_the_other_convention_is_an_offset_of_minus_one(run):
    report = run("norm_minus_one", ("config", "weights"))
    first = report.findings[0]
    assert first.kind == "offset" and first.summary.startswith(
        "norm and input_layernorm, post_attention_layernorm in all 30 layers = reference − 1: an RMSNorm weight "
        "in the (1 + w) convention")
    offsets = [r for r in report.weights if r.kind == "offset"]
    assert len(offsets) == 2 * LAYERS + 1 and all(r.name.endswith("norm.weight") for r in offsets)
    assert all(abs(r.offset + 1) < 1e-6 for r in offsets)


def test_two_exchanged_embedding_rows_are_named_by_token_id(run):
    report = run("embedding_rows_exchanged", ("config", "weights"))
    first = report.findings[0]
    assert first.kind == "rows_moved"
    assert first.summary.startswith("embed_tokens: 2 token rows moved: ids 1000 ↔ 2000: those ids read another "
                                    "token's embedding")
    (moved,) = [r for r in report.weights if r.kind == "rows_moved"]
    assert moved.moves == [[1000, 2000], [2000, 1000]] and moved.moved == 2


def test_a_generation_config_with_the_wrong_eos_is_named_with_its_consequence(run):
    report = run("wrong_generation_eos", ("config", "weights"))
    first = report.findings[0]
    assert (first.source, first.kind) == ("tokenizer", "generation_config.eos_token_id")
    assert "candidate 0 ('<|endoftext|>') vs reference 2 ('<|im_end|>')" in first.summary
    assert "runs past the end of the turn" in first.summary
    assert set(report.weight_counts) == {"identical"} and report.departs


def test_a_chat_template_without_the_system_turn_is_named(run):
    report = run("template_without_system", ("config", "weights"))
    first = report.findings[0]
    assert (first.source, first.kind) == ("tokenizer", "chat_template")
    assert first.summary.endswith("the candidate's template drops the system turn: the system prompt never reaches "
                                  "the model")
    assert set(report.weight_counts) == {"identical"} and len(report.findings) == 1
