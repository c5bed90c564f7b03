"""`plan` sizes the fp32 reference on devices of its own (docs/design.md, "Scaling the
reference"): memory per tensor-parallel rank with the serving-dtype noise copy, the least
size that fits, and replicas for a traffic. Every expected figure is computed by hand here,
independently of `adapters.inspect_model.parameter_count`."""

from __future__ import annotations

import json
import math
import re

import pytest

from adapters.plan import DEVICES, Device, PlanError, Traffic, plan, render
from server.cli import main

GIB = 2**30
H100 = DEVICES["h100-80gb"]
H100_USABLE = 79.6 * GIB
OVERHEAD = 1 * GIB  # the reference's fixed reserve per rank


def config(hidden, layers, heads, kv_heads, intermediate, vocab, context=8192) -> dict:
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
            "max_position_embeddings": context, "tie_word_embeddings": False}


def params(c: dict) -> int:
    """Untied embeddings and head, GQA attention without biases, a gated MLP, two norms a layer."""
    h, d = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    q_and_o = 2 * h * c["num_attention_heads"] * d
    k_and_v = 2 * h * c["num_key_value_heads"] * d
    layer = q_and_o + k_and_v + 3 * h * c["intermediate_size"] + 2 * h
    return 2 * c["vocab_size"] * h + c["num_hidden_layers"] * layer + h


INTERNLM2_20B = config(6144, 48, 48, 8, 16384, 92544, context=32768)
LLAMA3_70B = config(8192, 80, 64, 8, 28672, 128256)
LLAMA31_405B = config(16384, 126, 128, 8, 53248, 128256, context=131072)
SMALL = config(64, 2, 4, 2, 128, 1000)


def hand_rank_bytes(c: dict, ranks: int, noise_bytes: int, batch: int = 2048) -> float:
    """fp32 weights and the noise copy split by the ranks, but for the input embedding (whole
    on every rank); one batch's logits (fp32 4 + the
    noise pass's 2 + one row's fp32 log-softmax 8 bytes, or fp32 logits + log-softmax 8 without
    a noise copy) and one layer's activations (16 hidden-widths of fp32) on every rank."""
    p = params(c)
    per_logit = 14 if noise_bytes else 8
    e = c["vocab_size"] * c["hidden_size"]
    return ((p - e) / ranks + e) * (4 + noise_bytes) + batch * c["vocab_size"] * per_logit \
        + batch * c["hidden_size"] * 4 * 16 + OVERHEAD


def test_the_hand_parameter_counts_are_the_known_ones():
    assert params(INTERNLM2_20B) == 19_861_149_696  # test_inspect's count
    assert params(LLAMA3_70B) == 70_553_706_496  # Llama-3-70B's checkpoint
    assert params(LLAMA31_405B) == 405_853_388_800  # Llama-3.1-405B's checkpoint
    assert params(SMALL) == 202_048


def test_per_rank_memory_of_a_small_config_by_hand():
    r = plan(SMALL, H100, shadow_batch_tokens=256).reference
    assert [m.ranks for m in r.by_size] == [1, 2]  # 2 KV heads cap the size
    m = r.at(2)
    assert m.fp32_weights == ((202_048 - 64_000) / 2 + 64_000) * 4 == 532_096  # the embedding whole
    assert m.noise_copy == ((202_048 - 64_000) / 2 + 64_000) * 2  # bf16, the default serving dtype
    assert m.logits == 256 * 1000 * (4 + 2 + 8) == 3_584_000
    assert m.hidden_states == 256 * 64 * 4 * 16 == 1_048_576
    assert m.overhead == OVERHEAD
    assert m.total == 532_096 + 266_048 + 3_584_000 + 1_048_576 + GIB == hand_rank_bytes(SMALL, 2, 2, 256)
    # A float32 candidate has no noise copy: its noise floor is the fp32 reference itself.
    fp32 = plan(SMALL, H100, dtype="fp32", shadow_batch_tokens=256).reference
    assert fp32.noise_dtype is None and fp32.at(2).noise_copy == 0
    assert fp32.at(2).logits == 256 * 1000 * 8 and fp32.at(2).total == hand_rank_bytes(SMALL, 2, 0, 256)
    # int8 weights serve bf16 activations: a bf16 noise copy.
    assert plan(SMALL, H100, dtype="int8").reference.noise_dtype == "bf16"


def test_a_tied_embedding_is_cut_with_the_head():
    tied = {**SMALL, "tie_word_embeddings": True}
    p = 202_048 - 64_000  # the head is the embedding: one table fewer
    m = plan(tied, H100, shadow_batch_tokens=256).reference.at(2)
    assert m.fp32_weights == p * 4 / 2 and m.noise_copy == p * 2 / 2


def test_internlm2_20b_needs_two_h100s_with_its_noise_copy_where_fp32_alone_fits_one():
    with_noise = plan(INTERNLM2_20B, H100).reference
    assert hand_rank_bytes(INTERNLM2_20B, 1, 2) > H100_USABLE >= hand_rank_bytes(INTERNLM2_20B, 2, 2)
    assert with_noise.at(1).total == pytest.approx(hand_rank_bytes(INTERNLM2_20B, 1, 2))
    assert with_noise.at(1).total / GIB == pytest.approx(115.20, abs=0.01)
    assert with_noise.at(2).total / GIB == pytest.approx(61.30, abs=0.01)
    assert with_noise.tensor_parallel == 2 and with_noise.nodes == 1
    fp32_alone = plan(INTERNLM2_20B, H100, noise_floor=False).reference
    assert hand_rank_bytes(INTERNLM2_20B, 1, 0) <= H100_USABLE
    assert fp32_alone.tensor_parallel == 1
    assert plan(INTERNLM2_20B, H100, dtype="fp32").reference.tensor_parallel == 1  # no noise copy either


def test_llama3_70b_needs_one_full_node():
    r = plan(LLAMA3_70B, H100).reference
    assert [m.ranks for m in r.by_size] == [1, 2, 4, 8]
    assert hand_rank_bytes(LLAMA3_70B, 4, 2) > H100_USABLE >= hand_rank_bytes(LLAMA3_70B, 8, 2)
    assert r.tensor_parallel == 8 and r.nodes == 1
    assert r.at(8).total == pytest.approx(hand_rank_bytes(LLAMA3_70B, 8, 2))
    assert plan(LLAMA3_70B, H100, noise_floor=False).reference.tensor_parallel == 4


def test_llama31_405b_is_capped_by_its_8_kv_heads_and_says_so():
    r = plan(LLAMA31_405B, H100).reference
    assert [m.ranks for m in r.by_size] == [1, 2, 4, 8]
    assert hand_rank_bytes(LLAMA31_405B, 8, 2) > H100_USABLE
    assert r.tensor_parallel is None and r.ranks is None and r.replicas is None
    fixed = 2048 * 128256 * 14 + 2048 * 16384 * 4 * 16 + OVERHEAD
    whole = 128256 * 16384 * 6  # the embedding, whole on every rank, in fp32 + bf16
    assert r.memory_ranks == math.ceil((params(LLAMA31_405B) * 6 - whole) / (H100_USABLE - fixed - whole)) == 37
    out = render(plan(LLAMA31_405B, H100))
    assert "memory asks for at least 37 ranks (5 nodes of 8)" in out
    assert "at most 8 (its 8 KV heads (num_key_value_heads) cap the size: each rank holds whole ones)" in out
    assert "pipeline stages across nodes, which the reference does not have" in out


def test_an_odd_vocabulary_refuses_every_split_and_is_named():
    gpt2_like = config(2048, 24, 16, 16, 8192, 50257)
    p = plan(gpt2_like, Device("small", 8, 100))
    assert [m.ranks for m in p.reference.by_size] == [1] and p.reference.memory_ranks == 2
    assert ("splits over at most 1 (vocabulary (vocab_size) 50257 does not divide by tensor-parallel size 2)"
            in render(p))


def test_a_model_whose_dimensions_allow_it_spans_nodes():
    """The 405B with as many KV heads as query heads: the sizes go to 128, and 64 ranks fit."""
    mha = config(16384, 126, 128, 128, 53248, 128256)
    r = plan(mha, H100).reference
    assert r.by_size[-1].ranks == 128
    assert hand_rank_bytes(mha, 32, 2) > H100_USABLE >= hand_rank_bytes(mha, 64, 2)
    assert r.tensor_parallel == 64 and r.nodes == 8
    assert "a replica is 64 rank(s) on 8 node(s) of 8 devices" in render(plan(mha, H100))


@pytest.mark.parametrize(("size", "named"), [
    (3, "KV heads (num_key_value_heads) 8 does not divide by tensor-parallel size 3"),
    (16, "KV heads (num_key_value_heads) 8 does not divide by tensor-parallel size 16"),
    (6, "intermediate size (intermediate_size) 16384 does not divide by tensor-parallel size 6"),
])
def test_a_size_that_does_not_divide_is_refused_naming_the_dimension(size, named):
    with pytest.raises(PlanError, match=rf"--reference-tensor-parallel-size {size}: .*{re.escape(named)}"):
        plan(INTERNLM2_20B, H100, reference_tensor_parallel=size)


def test_replicas_by_hand():
    p = params(INTERNLM2_20B)
    r = plan(INTERNLM2_20B, H100).reference  # defaults: 10,000 tokens/s, rate 0.05, 1:1, MFU 0.4
    scored = 10_000 * 0.05 * (1 + 1)
    per_replica = 2 * 0.4 / (2 * p / 67e12 + 2 * p / 989e12)
    x = r.replicas
    assert x.traffic.scored_tokens_per_s == scored == 1000
    assert x.fp32_flops == x.noise_flops == 2 * p
    assert x.ranks == 2 and x.replica_tokens_per_s == pytest.approx(per_replica)
    assert round(per_replica) == 1264 and x.replicas == 1
    # Heavier traffic on A100s, at a given size of 4: 50,000 tokens/s, rate 0.1, 3 prompt tokens per output.
    traffic = Traffic(candidate_tokens_per_s=50_000, shadow_rate=0.1, prompt_ratio=3, mfu=0.5)
    x = plan(INTERNLM2_20B, DEVICES["a100-80gb"], reference_tensor_parallel=4, traffic=traffic).reference.replicas
    per_replica = 4 * 0.5 / (2 * p / 19.5e12 + 2 * p / 312e12)
    assert x.ranks == 4 and x.replica_tokens_per_s == pytest.approx(per_replica)
    assert x.replicas == math.ceil(50_000 * 0.1 * 4 / per_replica) == 22
    # A float32 candidate: the fp32 pass alone.
    x = plan(INTERNLM2_20B, H100, dtype="fp32").reference.replicas
    assert x.noise_flops == 0 and x.replica_tokens_per_s == pytest.approx(1 * 0.4 * 67e12 / (2 * p))


def test_a_given_size_that_does_not_fit_falls_back_to_the_least_that_does():
    r = plan(INTERNLM2_20B, H100, reference_tensor_parallel=1).reference
    assert r.given == 1 and r.ranks == 2 and r.replicas.ranks == 2
    assert "--reference-tensor-parallel-size 1: 115.20 GiB a rank, does not fit 79.6 GiB" in render(
        plan(INTERNLM2_20B, H100, reference_tensor_parallel=1))
    assert plan(INTERNLM2_20B, H100, reference_tensor_parallel=8).reference.ranks == 8


def test_a_custom_device_has_no_flops_and_no_replicas():
    p = plan(INTERNLM2_20B, Device("custom", 79.6, 3350))
    assert p.reference.tensor_parallel == 2 and p.reference.replicas is None
    assert "TFLOP/s are unknown" in render(p)


def test_the_rendered_arithmetic(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(INTERNLM2_20B))
    main(["plan", str(path), "--device", "h100-80gb"])
    out = capsys.readouterr().out
    assert "| per rank at N = 2 | memory | arithmetic |" in out
    assert ("| fp32 weights | 38.05 GiB | (1.99e+10 params − 5.69e+08 embedding) × 4 bytes / 2 + the embedding × 4 "
            "bytes |") in out
    assert "| noise copy | 19.03 GiB | the same in bf16, the serving dtype (2 bytes a parameter) |" in out
    assert "| total | 61.30 GiB | of 79.6 GiB usable: fits |" in out
    assert "1 → 115.20 GiB (no), 2 → 61.30 GiB, 4 → 34.35 GiB, 8 → 20.87 GiB" in out
    assert "reference tensor-parallel size: 2, the least that fits" in out
    assert "- scored tokens/s = 10,000 × 0.05 × (1 + 1) = 1,000" in out
    assert "- replicas = ceil(1,000 / 1,264) = 1 (2 h100-80gb device(s))" in out
    # The existing line stays, and says what it leaves out.
    assert "fp32 reference: 75.40 GiB" in out and "without the serving-dtype noise copy" in out
    main(["plan", str(path), "--device", "h100-80gb", "--candidate-tokens-per-s", "40000", "--shadow-rate", "0.1",
          "--prompt-ratio", "3", "--mfu", "0.5", "--shadow-noise-floor", "false", "--block-size", "32"])
    out = capsys.readouterr().out
    assert "| noise copy | 0.00 GiB | none" in out and "reference tensor-parallel size: 1" in out
    assert "- scored tokens/s = 40,000 × 0.1 × (1 + 3) = 16,000" in out
    assert "67e12 FLOP/s (fp32, TF32 off)) = 843 tokens/s" in out  # --block-size keeps the device's FLOP/s
    with pytest.raises(SystemExit, match="KV heads .* 8 does not divide by tensor-parallel size 3"):
        main(["plan", str(path), "--device", "h100-80gb", "--reference-tensor-parallel-size", "3"])
