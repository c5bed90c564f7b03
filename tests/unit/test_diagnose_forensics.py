"""Weight forensics on synthetic tensor pairs: each rung of the ladder, the figures it
reports, and the chunked statistics against a direct computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adapters.diagnose import chunked
from adapters.diagnose.chunked import ulp
from adapters.diagnose.forensics import Pair, classify, head_dim_ratio, rotary_rows


@pytest.fixture
def ref() -> torch.Tensor:
    return torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * 0.05


def test_identical_and_single_casts_are_clean(ref):
    assert classify("w", ref.clone(), ref).kind == "identical"
    for dtype in (torch.bfloat16, torch.float16):
        result = classify("w", ref.to(dtype), ref)
        assert result.kind == "rounding" and result.off_fraction == 0 and result.compared_in == str(dtype)[6:]


def test_a_constant_scale_is_reported_with_its_head_dim_ratio(ref):
    result = classify("q", ref * (16 / 14.96), ref)
    assert result.kind == "scaled" and abs(result.scale - 16 / 14.96) < 1e-6
    assert "√256/√224" in result.detail
    # in bf16 the update must stand clear of bf16's own rounding (~0.15% of ‖W‖ here) to be seen
    in_bf16 = classify("q", (ref * 1.25).to(torch.bfloat16), ref)
    assert in_bf16.kind == "scaled" and abs(in_bf16.scale - 1.25) < 1e-3


def test_head_dim_ratio():
    assert head_dim_ratio(16 / 14.96) == (256, 224)  # the largest pair of the same ratio
    assert head_dim_ratio(math.sqrt(128 / 64)) == (256, 128)
    assert head_dim_ratio(1.01) is None


def test_a_swap_names_the_sibling(ref):
    other = torch.randn_like(ref)
    result = classify("k", other, ref, Pair(siblings={"v": lambda: other, "q": lambda: ref * 2}))
    assert (result.kind, result.other) == ("swapped", "v")


@pytest.mark.parametrize("dim, order", [(0, [2, 0, 1]), (1, [1, 0]), (0, [0, 1, 3, 2])])
def test_block_permutations_report_the_order(ref, dim, order):
    parts = torch.chunk(ref, len(order), dim=dim)
    cand = torch.cat([parts[j] for j in order], dim=dim).to(torch.bfloat16)
    result = classify("w", cand, ref)
    assert (result.kind, result.block_dim, result.blocks) == ("permuted", dim, order)


def test_rotary_layouts_both_ways(ref):
    heads = 3  # 96 rows = 3 heads of 32
    index = rotary_rows(96, heads)
    interleaved = ref[torch.argsort(index)]  # what a Meta checkpoint holds
    assert torch.equal(interleaved[index], ref)
    result = classify("q", interleaved, ref, Pair(rotary_heads=heads))
    assert result.kind == "rotary" and "not applied" in result.detail
    twice = classify("q", ref[index], ref, Pair(rotary_heads=heads))
    assert twice.kind == "rotary" and "applied to weights already in the HF layout" in twice.detail


def test_low_rank_differences_with_and_without_the_adapter(ref):
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(96, 3, generator=g) * 0.04, torch.randn(3, 64, generator=g) * 0.04  # ‖BA‖ = 6% of ‖W‖
    plain = classify("w", ref + b @ a, ref)
    assert (plain.kind, plain.rank, plain.adapter_multiple) == ("low_rank", 3, None)
    delta = b @ a
    twice = classify("w", ref + delta, ref, Pair(adapter_delta=lambda: delta, adapter_rank=3))
    assert twice.kind == "low_rank" and abs(twice.adapter_multiple - 1) < 1e-5 and twice.rank == 3
    # in bf16 the update must stand clear of bf16's own rounding (~0.15% of ‖W‖ here) to be seen
    in_bf16 = classify("w", (ref - 0.5 * delta).to(torch.bfloat16), ref, Pair(adapter_delta=lambda: delta, adapter_rank=3))
    assert in_bf16.kind == "low_rank" and abs(in_bf16.adapter_multiple + 0.5) < 0.02


def test_rounding_beyond_counts_the_elements_off(ref):
    noisy = ref * (1 + 0.004 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)))
    result = classify("w", noisy.to(torch.bfloat16), ref)
    assert result.kind == "rounding_beyond"
    # independent count: elements whose bf16 value is not the bf16 rounding of the reference
    expected = (noisy.to(torch.bfloat16) != ref.to(torch.bfloat16)).float().mean().item()
    assert result.off_fraction == pytest.approx(expected) and expected > 0.2


def test_fp16_overflow_is_named_not_rounding(ref):
    big = ref.clone()
    big[0, :3] = 70000.0  # beyond float16's 65504: the cast makes them inf
    result = classify("w", big.to(torch.float16), big)
    assert result.kind == "non_finite" and result.detail.startswith("3 element(s) inf or nan")
    assert "overflows float16" in result.detail


def test_a_cast_through_float16_then_bfloat16_is_named_apart_from_arithmetic(ref):
    """The rule: a candidate stored in one half-precision dtype that is not its single rounding
    of the reference, but equals the rounding of the reference's rounding to the other one on
    all but 0.1% of elements, is a cast through that dtype (precision, no arithmetic)."""
    twice = ref.to(torch.float16).to(torch.bfloat16)
    result = classify("w", twice, ref)
    assert (result.kind, result.through, result.flushed) == ("cast_twice", "float16", 0)
    # the double rounding moves ~6% of elements by one ulp off the direct cast
    expected = (twice != ref.to(torch.bfloat16)).float().mean().item()
    assert result.off_fraction == pytest.approx(expected) and 0.02 < expected < 0.12
    assert result.detail.startswith("cast through float16, then bfloat16: each element is the bfloat16 rounding")
    back = classify("w", ref.to(torch.bfloat16).to(torch.float16), ref)  # bf16's values stored in fp16
    assert (back.kind, back.through) == ("cast_twice", "bfloat16")
    # float16's range: under 2^-25 the first cast flushes to 0, and that is counted
    tiny = ref.clone()
    tiny[0, :10] = 1e-8
    flushed = classify("w", tiny.to(torch.float16).to(torch.bfloat16), tiny)
    assert (flushed.kind, flushed.flushed) == ("cast_twice", 10)
    assert "10 element(s) under float16's range flushed to 0" in flushed.detail
    # beyond float16's 65504 (within bfloat16's range) the first cast overflows
    big = ref.clone()
    big[0, :3] = 70000.0
    overflow = classify("w", big.to(torch.float16).to(torch.bfloat16), big)
    assert overflow.kind == "non_finite" and "overflows float16: cast through float16, then bfloat16" in overflow.detail
    # arithmetic in bf16 (an update added in bf16, as a low-precision merge does) stays rounding beyond
    g = torch.Generator().manual_seed(4)
    delta = (torch.randn(96, 4, generator=g) @ torch.randn(4, 64, generator=g)) * 0.002
    merged = classify("w", ref.to(torch.bfloat16) + delta.to(torch.bfloat16), ref + delta)
    assert merged.kind == "rounding_beyond" and merged.through is None
    assert classify("w", ref.to(torch.bfloat16), ref).kind == "rounding"  # a plain cast stays a cast


def test_differing_shape_and_integers(ref):
    other = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    result = classify("w", other, ref)
    assert result.kind == "differing" and result.rel_error > 1
    assert "size of bfloat16 rounding" in classify("w", ref * (1 + 0.003 * torch.randn_like(ref)), ref).detail
    assert classify("w", ref.T.contiguous(), ref).detail.endswith("(transposed)")
    assert classify("i", torch.arange(5), torch.arange(5)).kind == "identical"
    assert classify("i", torch.arange(5), torch.arange(5) + 1).kind == "differing"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ulp_matches_numpy_spacing(dtype):
    values = torch.tensor([0.0, 1e-8, 3e-5, 0.1, 1.0, 3.5, 1000.0, -2.0, -0.3]).to(dtype)  # ulp: the spacing above |x|
    ours = ulp(values.float(), dtype)
    if dtype is torch.bfloat16:  # numpy has no bfloat16: its spacing is 2^16 float32 spacings at its values
        expected = np.spacing(np.abs(values.float().numpy()), dtype=np.float32) * 2**16
        expected[0] = 2.0**-133  # the smallest bf16 subnormal
    else:
        np_dtype = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
        expected = np.spacing(np.abs(values.float().numpy()).astype(np_dtype)).astype(np.float64)
    assert np.allclose(ours.numpy(), expected, rtol=0, atol=0), (ours, expected)


def test_chunked_statistics_equal_the_whole_tensor(ref, monkeypatch):
    cand = (ref * (1 + 0.004 * torch.randn_like(ref))).to(torch.bfloat16)
    whole = classify("w", cand, ref)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 100)  # one or two rows per chunk
    in_chunks = classify("w", cand, ref)
    assert in_chunks.kind == whole.kind and in_chunks.off_fraction == whole.off_fraction
    assert in_chunks.rel_error == pytest.approx(whole.rel_error, rel=1e-12)
    direct = float((cand.double() - ref.double()).norm() / ref.double().norm())
    assert whole.rel_error == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_constant_offset_and_the_rmsnorm_convention(dtype):
    norm = 1 + 0.2 * torch.randn(64, generator=torch.Generator().manual_seed(4))
    gemma = classify("model.norm.weight", (norm - 1).to(dtype), norm, Pair(norm_weight=True))
    assert gemma.kind == "offset" and gemma.offset == pytest.approx(-1, abs=2e-3)
    assert "(1 + w) convention" in gemma.detail and "w − 1 instead of w" in gemma.detail
    plus = classify("model.norm.weight", (norm + 1).to(dtype), norm, Pair(norm_weight=True))
    assert plus.kind == "offset" and "1 added" in plus.detail
    # a matrix shifted by a constant: named with the constant, no norm convention
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(5)) * 0.05
    shifted = classify("w", (w + 0.02).to(dtype), w)
    assert shifted.kind == "offset" and shifted.offset == pytest.approx(0.02, rel=1e-2)
    assert shifted.detail == "reference + 0.02"


def test_a_tensor_equal_to_another_layers_is_found_by_its_norm_and_confirmed(ref):
    layers = {f"model.layers.{i}.mlp.up_proj.weight":
              torch.randn(ref.shape, generator=torch.Generator().manual_seed(10 + i)) * (1 + 0.2 * i) for i in range(4)}
    loaded = []

    def load(name):
        loaded.append(name)
        return layers[name]

    pair = Pair(other_layers={n: (lambda n=n: load(n)) for n in layers if "layers.3." not in n},
                norm_of=lambda name: float(layers[name].norm()))
    result = classify("model.layers.3.mlp.up_proj.weight", layers["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16),
                      layers["model.layers.3.mlp.up_proj.weight"], pair)
    assert (result.kind, result.other) == ("other_layer", "model.layers.1.mlp.up_proj.weight")
    assert loaded == ["model.layers.1.mlp.up_proj.weight"]  # the norm filter left only the match to compare in full
    unrelated = classify("model.layers.3.mlp.up_proj.weight", torch.randn(ref.shape), layers["model.layers.3.mlp.up_proj.weight"], pair)
    assert unrelated.kind == "differing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embedding_rows_moved_are_named_by_id(dtype):
    vocab = torch.randn(5000, 32, generator=torch.Generator().manual_seed(6))
    cand = vocab.clone()
    cand[[17, 4242]] = vocab[[4242, 17]]  # an exchange
    cand[[100, 200, 300]] = vocab[[200, 300, 100]]  # a 3-cycle: row 100 holds reference row 200
    result = classify("model.embed_tokens.weight", cand.to(dtype), vocab, Pair(vocab_rows=True))
    assert result.kind == "rows_moved" and result.moved == 5
    assert sorted(map(tuple, result.moves)) == [(17, 4242), (100, 200), (200, 300), (300, 100), (4242, 17)]
    assert result.detail.startswith("5 rows moved: ") and "17 ↔ 4242" in result.detail and "100 ← 200" in result.detail
    # rows changed but not moved anywhere: no rows_moved
    edited = vocab.clone()
    edited[[3, 9]] = torch.randn(2, 32)
    assert classify("model.embed_tokens.weight", edited, vocab, Pair(vocab_rows=True)).kind != "rows_moved"


def test_two_exchanged_rows_of_a_large_bf16_embedding_are_damage_not_rounding():
    """0.9% of the norm, inside bf16's tolerance, 4e-5 of the elements: the old rule called
    it rounding. Each element may exceed its own ulp by 2^-p of the tensor's RMS, no more."""
    vocab = torch.randn(49152, 32, generator=torch.Generator().manual_seed(7)) * 0.05
    cand = vocab.clone()
    cand[[1000, 2000]] = vocab[[2000, 1000]]
    named = classify("model.embed_tokens.weight", cand.to(torch.bfloat16), vocab, Pair(vocab_rows=True))
    assert (named.kind, named.moves) == ("rows_moved", [[1000, 2000], [2000, 1000]])
    plain = classify("w", cand.to(torch.bfloat16), vocab)  # no row search: still not rounding (a rank-2 difference)
    assert plain.kind not in ("identical", "rounding", "rounding_beyond") and plain.rel_error < 0.012
    scattered = vocab.clone()
    spots = torch.randperm(vocab.numel(), generator=torch.Generator().manual_seed(11))[:100]
    scattered.view(-1)[spots] = 0.0  # 100 elements zeroed: 0.5% of the norm
    damaged = classify("w", scattered.to(torch.bfloat16), vocab)
    assert damaged.kind == "differing" and "local damage" in damaged.detail and damaged.rel_error < 0.012
    copied = vocab.clone()
    copied[1000] = vocab[2000]  # a copy of a row that did not move
    moved = classify("model.embed_tokens.weight", copied.to(torch.bfloat16), vocab, Pair(vocab_rows=True))
    assert (moved.kind, moved.moves, moved.detail) == ("rows_moved", [[1000, 2000]], "1 row moved: 1000 ← 2000")


def test_damage_next_to_an_outlier_is_not_rounding():
    norm = 0.5 + 0.05 * torch.randn(4096, generator=torch.Generator().manual_seed(8))
    norm[7] = 30.0  # one outlier channel
    cand = norm.clone()
    cand[[100, 200]] += torch.tensor([0.2, -0.2])  # 40% off on two channels
    assert classify("model.norm.weight", cand.to(torch.bfloat16), norm, Pair(norm_weight=True)).kind == "differing"
    assert classify("model.norm.weight", norm.to(torch.bfloat16), norm, Pair(norm_weight=True)).kind == "rounding"


def test_a_layer_near_its_own_reference_is_not_blamed_on_a_duplicate():
    """Depth up-scaling duplicates layers: the reference's layer 1 equals its layer 0. A
    candidate cast twice (fp32 -> fp16 -> bf16) is a cast through fp16 of its own layer,
    never 'holds layer 0's weights'."""
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(9)) * 0.05
    twice = w.to(torch.float16).to(torch.bfloat16)
    pair = Pair(other_layers={"model.layers.0.mlp.up_proj.weight": lambda: w}, norm_of=lambda name: float(w.norm()))
    assert classify("model.layers.1.mlp.up_proj.weight", twice, w.clone(), pair).kind == "cast_twice"


def test_a_tensor_written_as_zeros_is_named_zeroed(ref):
    """Qwen2's q/k/v biases dropped by a converter that writes only `.weight` tensors, then
    materialised as zeros by from_pretrained/save_pretrained: it read "differ without a
    named cause"; a tensor the reference holds below the dtype's range stays rounding."""
    bias = ref[0]
    for dtype in (torch.float32, torch.bfloat16):
        result = classify("model.layers.0.self_attn.q_proj.bias", torch.zeros_like(bias, dtype=dtype), bias)
        assert result.kind == "zeroed" and "all zeros where the reference is not" in result.detail
    tiny = torch.full((8,), 1e-42)  # an fp32 subnormal: bf16 keeps it, fp16 flushes it to 0
    assert classify("b", torch.zeros(8, dtype=torch.float16), tiny).kind == "rounding"
