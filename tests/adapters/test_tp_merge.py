"""Tensor/pipeline-parallel merge on real SmolLM2 shards (TP=3: one KV group per rank)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.errors import AdapterError
from adapters.internlm2 import convert_internlm2_to_llama
from adapters.tp_merge import merge_tp
from tests.adapters.conftest import copy_tokenizer, internlm2_state, split_for_tp


def test_tp3_pp2_pt_shards_merge_then_convert_to_the_original_bit_for_bit(tp_shards_dir, smol_weights, tmp_path):
    merged = merge_tp(tp_shards_dir, tmp_path / "merged")
    llama = load_file(convert_internlm2_to_llama(merged, tmp_path / "llama") / "model.safetensors")
    expected = {**smol_weights, "lm_head.weight": smol_weights["model.embed_tokens.weight"]}
    assert llama.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(llama[name], tensor), name
    provenance = json.loads((merged / "provenance.json").read_text())
    assert "detected tp=3, pp=2 from file names" in provenance["rules"]


def test_per_rank_safetensors_merge(internlm2_dir, smol_weights, smol_config, tmp_path):
    src = tmp_path / "st"
    src.mkdir()
    state = internlm2_state(smol_weights, smol_config)
    for t, rank in enumerate(split_for_tp(state, 3)):
        save_file(rank, src / f"model_tp{t}_pp0.safetensors")
    shutil.copy2(internlm2_dir / "config.json", src / "config.json")
    copy_tokenizer(internlm2_dir, src)
    merged = load_file(merge_tp(src, tmp_path / "merged") / "model.safetensors")
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[n], state[n]) for n in state)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_a_lone_shard_of_a_3_way_split_is_explained(tp_shards_dir, tmp_path):
    src = tmp_path / "lone"
    src.mkdir()
    for p in (0, 1):  # only rank 0 of each stage, named as if tp were 1
        shutil.copy2(tp_shards_dir / f"model_tp0_pp{p}.pt", src / f"model_tp0_pp{p}.pt")
    shutil.copy2(tp_shards_dir / "config.json", src / "config.json")
    with pytest.raises(AdapterError) as error:
        merge_tp(src, tmp_path / "out")
    message = str(error.value)
    assert "3-way tensor-parallel split" in message
    assert "model.tok_embeddings.weight" in message and "[16384, 576] from checkpoint vs [49152, 576] in model" in message


def test_the_classic_16_way_mismatch_gets_an_explanation(tmp_path):
    """[256, 4096] from checkpoint vs [4096, 4096] in model: one shard of a 16-way split."""
    config = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008,
              "vocab_size": 32000, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(256, 4096)}, tmp_path / "model_tp0_pp0.safetensors")
    with pytest.raises(AdapterError) as error:
        merge_tp(tmp_path, tmp_path / "out")
    message = str(error.value)
    assert "model.layers.0.self_attn.q_proj.weight" in message
    assert "[256, 4096] from checkpoint vs [4096, 4096] in model" in message
    assert "16-way" in message and "column-parallel" in message and "dim 0" in message


def test_missing_ranks_and_diverging_replicas_are_refused(tp_shards_dir, tmp_path):
    gap = tmp_path / "gap"
    shutil.copytree(tp_shards_dir, gap)
    (gap / "model_tp1_pp1.pt").unlink()
    with pytest.raises(AdapterError, match=r"tensor-parallel rank 1 of 3 is missing from pipeline stage 1 of 2"):
        merge_tp(gap, tmp_path / "out1")
    drift = tmp_path / "drift"
    shutil.copytree(tp_shards_dir, drift)
    rank = torch.load(drift / "model_tp2_pp1.pt")
    rank["model.norm.weight"] = rank["model.norm.weight"] + 1e-3
    torch.save(rank, drift / "model_tp2_pp1.pt")
    with pytest.raises(AdapterError, match="replicated weight differs between rank 0 and rank 2"):
        merge_tp(drift, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()  # nothing half-written left behind
