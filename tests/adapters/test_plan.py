"""`plan` (issue 11, item 3) against hand computation, for SmolLM2 and a 20B InternLM2-like
config, and against the KV-cache sizes vLLM itself logged on this machine."""

from __future__ import annotations

import json
import math

import pytest

from adapters.plan import DEVICES, Device, PlanError, plan
from server.cli import main

GIB = 2**30
SMOLLM2_PARAMS = 134_515_008  # counted from the checkpoint in test_inspect
C20B = {"hidden_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 48, "num_key_value_heads": 8,
        "intermediate_size": 16384, "vocab_size": 92544, "max_position_embeddings": 32768, "tie_word_embeddings": False}
C20B_PARAMS = 19_861_149_696  # test_inspect's hand count
CPU_1GIB = dict(device=Device("cpu", 23.54, 100, block_size=128), kv_cache_gib=1.0, reserve_gib=0)


def smollm2(demo_model) -> dict:
    return json.loads((demo_model / "config.json").read_text())


@pytest.mark.parametrize(("dtype", "logged"), [("fp32", 23_296), ("bf16", 46_592)])
def test_kv_tokens_match_what_vllm_logged(demo_model, dtype, logged):
    """vLLM 0.32 (CPU backend, --kv-cache-gib 1, block size 128) logged 'CPU KV cache size:
    23,296 tokens' for SmolLM2 in fp32 and 46,592 in bf16 (this suite's servers)."""
    assert plan(smollm2(demo_model), dtype=dtype, **CPU_1GIB).kv_tokens == logged


def test_smollm2_on_an_l4_by_hand(demo_model):
    p = plan(smollm2(demo_model), DEVICES["l4-24gb"])
    weights = SMOLLM2_PARAMS * 2
    per_token = 2 * 30 * 3 * 64 * 2  # K and V, 30 layers, 3 KV heads of 64, bf16
    assert p.weights_per_device == weights and p.kv_bytes_per_token_per_device == per_token == 23_040
    assert p.kv_tokens == (22.0 * GIB * 0.9 - weights - 1.5 * GIB) // (per_token * 16) * 16
    assert p.sequences_at_max_context == p.kv_tokens // 8192
    assert p.decode_tokens_per_s == pytest.approx(300e9 / weights)
    # fp32 reference: 4 bytes a weight + two fp32 copies of a 2048-token batch's logits over 49152 ids.
    assert p.reference_bytes == SMOLLM2_PARAMS * 4 + 2 * 2048 * 49152 * 4
    assert p.reference_devices == 0  # ~1.25 GiB fits in the 10 % vLLM leaves (2.2 GiB)


def test_20b_fp16_on_one_l4_does_not_fit_and_is_slow():
    p = plan(C20B, DEVICES["l4-24gb"], dtype="fp16")
    assert p.weights_per_device / GIB == pytest.approx(37.0, abs=0.05)
    assert not p.fits and p.kv_tokens == 0
    assert p.decode_tokens_per_s == pytest.approx(300e9 / (C20B_PARAMS * 2)) and p.decode_tokens_per_s < 8
    # TP 2: 18.5 GiB of weights + 1.5 reserve > 19.8 usable; TP 4: 9.25 GiB leaves 9.05 GiB of KV cache.
    assert p.smallest_fitting_degree == 4
    # The reference: 79.4 GB fp32 + logits, on L4s at 95 % of 22 GiB.
    reference = C20B_PARAMS * 4 + 2 * 2048 * 92544 * 4
    assert p.reference_devices == math.ceil(reference / (22.0 * GIB * 0.95)) == 4


def test_20b_tensor_parallel_splits_kv_heads_then_replicates_them():
    by_tp = {tp: plan(C20B, DEVICES["h100-80gb"], tp) for tp in (1, 2, 8, 16)}
    assert {tp: p.kv_bytes_per_token_per_device for tp, p in by_tp.items()} == {
        1: 2 * 48 * 8 * 128 * 2, 2: 2 * 48 * 4 * 128 * 2, 8: 2 * 48 * 1 * 128 * 2, 16: 2 * 48 * 1 * 128 * 2}
    assert by_tp[2].weights_per_device == C20B_PARAMS * 2 / 2
    assert by_tp[8].decode_tokens_per_s == pytest.approx(8 * by_tp[1].decode_tokens_per_s)
    # One H100 holds the 20B in bf16, but the fp32 reference (75.4 GiB) needs one of its own:
    # the 10 % vLLM leaves is 8 GiB; 95 % of another H100 is 75.6 GiB.
    assert by_tp[1].fits and by_tp[1].reference_bytes / GIB == pytest.approx(75.40, abs=0.01)
    assert by_tp[1].reference_devices == 1
    # Across 16 devices the leftover (16 x 7.96 GiB) holds it beside the candidate.
    assert by_tp[16].reference_devices == 0


def test_a_degree_vllm_refuses_is_refused():
    with pytest.raises(PlanError, match="48 attention heads and 8 KV heads"):
        plan(C20B, DEVICES["h100-80gb"], 3)


def test_cli(demo_model, capsys):
    main(["plan", str(demo_model), "--device", "l4-24gb"])
    out = capsys.readouterr().out
    assert "23,040 bytes" in out and "fits beside the candidate" in out
    with pytest.raises(SystemExit, match="unknown device 'l5'"):
        main(["plan", str(demo_model), "--device", "l5"])
    main(["plan", str(demo_model), "--memory-gib", "23.54", "--bandwidth-gbs", "100", "--block-size", "128",
          "--kv-cache-gib", "1", "--reserve-gib", "0", "--dtype", "fp32"])
    assert "| KV cache | 23,296 tokens" in capsys.readouterr().out
