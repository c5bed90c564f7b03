"""The config pass across architectures' names, and the findings' grouping and ranking."""

from __future__ import annotations

import copy

from adapters.diagnose.activations import ActivationReport, LogitSummary, SiteError
from adapters.diagnose.configs import diff_configs
from adapters.diagnose.findings import Facts, rank_findings, settle_tied_head, tensor_groups, weight_findings
from adapters.diagnose.forensics import TensorResult
from adapters.internlm2 import llama_config

LLAMA = {
    "model_type": "llama", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "intermediate_size": 1536, "num_hidden_layers": 30, "vocab_size": 49152, "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 2, "max_position_embeddings": 8192,
}
INTERNLM2 = {
    "model_type": "internlm2", "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
    "intermediate_size": 1536, "num_hidden_layers": 30, "vocab_size": 49152, "rms_norm_eps": 1e-5,
    "rope_theta": 100000, "rope_scaling": None, "bias": False, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "max_position_embeddings": 8192,
}
FACTS = Facts(layers=30, head_dim=64)


def changed(base: dict, **fields) -> dict:
    out = copy.deepcopy(base)
    out.update(fields)
    return out


def test_the_converters_own_llama_config_matches_its_internlm2_source():
    assert diff_configs(llama_config(INTERNLM2), INTERNLM2) == []


def test_equal_values_under_other_names_and_float32_rounding_are_not_differences():
    legacy = changed(LLAMA, rope_parameters=None, rope_theta=100000.0, rope_scaling=None, rms_norm_eps=1e-5)
    assert diff_configs(legacy, LLAMA) == []


def test_forward_changing_fields_are_reported_with_both_values():
    cand = changed(LLAMA, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, attn_logit_softcapping=50.0,
                   eos_token_id=[2, 7])
    found = {d.field: d for d in diff_configs(cand, LLAMA)}
    assert set(found) == {"rope_theta", "attn_logit_softcapping", "eos_token_id"}
    assert (found["rope_theta"].candidate, found["rope_theta"].reference) == (10000.0, 100000.0)
    assert all(d.forward for d in found.values())


def test_attention_scale_is_reported_through_its_source():
    found = {d.field for d in diff_configs(changed(LLAMA, query_pre_attn_scalar=224), LLAMA)}
    assert found == {"query_pre_attn_scalar"}
    found = {d.field for d in diff_configs(changed(LLAMA, head_dim=48), LLAMA)}
    assert found == {"head_dim"}


def test_informational_differences_are_not_findings():
    diffs = diff_configs(changed(LLAMA, max_position_embeddings=2048), LLAMA)
    assert [(d.field, d.forward) for d in diffs] == [("max_position_embeddings", False)]
    assert rank_findings(diffs, [], None, FACTS) == []
    scaled = changed(LLAMA, max_position_embeddings=2048,
                     rope_parameters={"rope_theta": 100000.0, "rope_type": "yarn", "factor": 4.0})
    assert {(d.field, d.forward) for d in diff_configs(scaled, changed(LLAMA, rope_parameters=scaled["rope_parameters"]))} \
        == {("max_position_embeddings", True)}


def result(name: str, kind: str, **fields) -> TensorResult:
    return TensorResult(name=name, kind=kind, shape=[576, 576], **fields)


def test_layers_group_and_ranges():
    results = [result(f"model.layers.{i}.self_attn.q_proj.weight", "scaled", scale=1.25) for i in (0, 1, 2, 5)]
    results.append(result("model.layers.3.self_attn.q_proj.weight", "identical"))
    (finding,) = weight_findings(results, FACTS)
    assert finding.summary.startswith("q_proj in layers 0-2, 5 = 1.2500 × reference")
    assert len(finding.tensors) == 4


def test_ranking_and_the_activation_join():
    diffs = diff_configs(changed(LLAMA, rms_norm_eps=1e-6), LLAMA)
    weights = [result("model.layers.0.mlp.up_proj.weight", "rounding_beyond", compared_in="bfloat16", off_fraction=0.2),
               result("model.layers.0.self_attn.k_proj.weight", "swapped", other="model.layers.0.self_attn.v_proj.weight"),
               result("model.layers.0.mlp.down_proj.weight", "differing", rel_error=0.5)]
    site = SiteError(layer=0, site="attention", candidate=0.1, envelope=0.001, ratio=100.0)
    acts = ActivationReport(serving_dtype="bfloat16", prompts=1, tokens=5, reference_loaded_as="", candidate_loaded_as="",
                            sites=[site], first_departure=site, also_off=["MLP input"],
                            logits=LogitSummary(max_abs_logit_diff=1, kl_mean=1, envelope_max_abs_logit_diff=0.1,
                                                envelope_kl_mean=0.01))
    ranked = rank_findings(diffs, weights, acts, FACTS)
    assert [f.kind for f in ranked] == ["swapped", "rms_norm_eps", "differing", "rounding_beyond"]
    assert ranked[0].summary.endswith("first departure: layer 0, self-attention output, 100× the bfloat16 envelope; "
                                      "MLP input also off")
    alone = rank_findings([], [], acts, FACTS)
    assert [f.kind for f in alone] == ["departure"] and "config and weights agree" in alone[0].summary


def head(kind: str, **fields) -> TensorResult:
    return TensorResult(name="lm_head.weight", kind=kind, shape=[49152, 576], **fields)


def test_an_untied_head_equal_to_the_embedding_is_informational():
    """tie_word_embeddings differs, but the weight pass finds the head that runs on each side
    the same (bitwise, one bf16 rounding, a cast through fp16): no finding, the difference
    kept as information; a head that differs, or no weight pass, leaves the finding."""
    untied = diff_configs(changed(LLAMA, tie_word_embeddings=False), LLAMA)
    assert [(d.field, d.forward) for d in untied] == [("tie_word_embeddings", True)]
    for same, how in ((head("identical"), "bitwise"), (head("rounding", compared_in="bfloat16"),
                                                        "up to one bfloat16 rounding"),
                      (head("cast_twice", compared_in="bfloat16", through="float16", off_fraction=0.05),
                       "up to a cast through float16, then bfloat16")):
        assert [f.kind for f in rank_findings(untied, [same], None, FACTS)] == ([] if same.kind in ("identical", "rounding")
                                                                               else ["cast_twice"])
        (info,) = settle_tied_head(untied, [same])
        assert not info.forward and info.consequence == (
            "the candidate writes its output head out as its own tensor (lm_head.weight), equal to the reference's "
            f"tied embedding {how}: the same output head")
    tied = diff_configs(LLAMA, changed(LLAMA, tie_word_embeddings=False))  # the converse: the candidate ties
    (info,) = settle_tied_head(tied, [head("rounding", compared_in="bfloat16")])
    assert not info.forward and info.consequence.startswith("the candidate ties its output head to its embedding, "
                                                            "equal to the reference's own lm_head.weight")
    for differs in (head("differing", rel_error=0.5), head("rows_moved", detail="2 rows moved: 1 ↔ 2", moves=[[1, 2], [2, 1]], moved=2),
                    head("rounding_beyond", compared_in="bfloat16", off_fraction=0.2)):
        for diffs in (untied, tied):
            ranked = rank_findings(diffs, [differs], None, FACTS)
            assert "tie_word_embeddings" in [f.kind for f in ranked]
    assert [f.kind for f in rank_findings(untied, None, None, FACTS)] == ["tie_word_embeddings"]  # --only config


def test_a_cast_through_float16_is_its_own_finding_not_a_merge():
    twice = [result(f"model.layers.{i}.mlp.up_proj.weight", "cast_twice", compared_in="bfloat16", through="float16",
                    off_fraction=0.03, flushed=i) for i in range(30)]
    merge = [result(f"model.layers.{i}.self_attn.q_proj.weight", "rounding_beyond", compared_in="bfloat16",
                    off_fraction=0.2) for i in range(30)]
    found = weight_findings(twice + merge, FACTS)
    assert [f.kind for f in found] == ["rounding_beyond", "cast_twice"]
    assert found[1].summary == (
        "up_proj in all 30 layers: cast through float16, then bfloat16: 3.0% of elements off the single bfloat16 "
        "rounding of the reference, each the bfloat16 rounding of its float16 rounding (435 element(s) under "
        "float16's range flushed to 0): a double cast (precision only; no arithmetic in low precision)")
    assert "merge in low precision" in found[0].summary and "merge" not in found[1].summary
    (row,) = tensor_groups(twice, FACTS)
    assert row[:2] == ("layers.*.mlp.up_proj in all 30 layers", "cast_twice")
    assert row[2].startswith("cast through float16, then bfloat16; relative error")


def test_gemma_and_qwen2_names_are_read_as_what_they_mean():
    """Gemma-2 names its activation `hidden_activation`; Qwen2's q/k/v biases are built in,
    with no `attention_bias` field: a Qwen2 converted to Llama with `attention_bias: true`
    is the same model, one converted without them is not."""
    gemma = changed(LLAMA, model_type="gemma2", hidden_act=None, hidden_activation="gelu_pytorch_tanh")
    assert [d.field for d in diff_configs(gemma, changed(gemma, hidden_activation="silu"))] == ["hidden_act"]
    qwen2 = changed(LLAMA, model_type="qwen2")
    del qwen2["attention_bias"]
    assert diff_configs(changed(LLAMA, attention_bias=True), qwen2) == []
    assert [d.field for d in diff_configs(LLAMA, qwen2)] == ["attention_bias"]
