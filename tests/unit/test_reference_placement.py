"""The local reference spread across devices with accelerate's device map (issue 11,
item 2): the same statistics as on one device, and a reference that cannot fit refused
at start with its size. On CPU the split is real offload: layers past the memory given
run from weights on disk, loaded for each forward by accelerate's hooks."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from shadow.local_scorer import LocalScorer
from shadow.placement import parse_max_memory, plan_device_map
from shadow.scoring import ScoreItem, ShadowReferenceError

ITEMS = [
    ScoreItem([1, 520, 9531, 198], [300, 301, 302, 2], [[300, 7], [301, 9, 10], [302], [2, 5]]),
    ScoreItem([1, 4093], [44, 45], [[44], [45, 46]]),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A small random Llama on disk (8 layers of ~1.3 MiB, ~26 MiB of embeddings), with the demo tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(7)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("placed") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_max_memory_parses_accelerates_form():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB,disk=1000GB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB",
                                                                           "disk": "1000GB"}
    for bad in ("", "gpu0=1GiB", "0:1GiB", "cpu=lots"):
        with pytest.raises(ValueError):
            parse_max_memory(bad)


def test_a_reference_that_cannot_fit_is_refused_before_loading(model_dir):
    with pytest.raises(ShadowReferenceError, match=r"needs 0\.\d\d GiB and does not fit in the memory given \(cpu=4MiB\)"):
        plan_device_map(model_dir, {"cpu": "4MiB"}, trust=False)
    with pytest.raises(ShadowReferenceError, match="names GPU 3"):
        plan_device_map(model_dir, {3: "1GiB"}, trust=False)


def test_split_reference_scores_as_the_whole_one(model_dir):
    whole = LocalScorer.load(model_dir, device="cpu")
    split = LocalScorer.load(model_dir, max_memory={"cpu": "30MiB", "disk": "1GiB"})
    placed = Counter(split.device_map.values())
    assert placed["cpu"] >= 1 and placed["disk"] >= 1, split.device_map  # really split
    a, b = whole.score_sync(ITEMS, top_m=5, noise_top_k=None), split.score_sync(ITEMS, top_m=5, noise_top_k=None)
    worst = 0.0
    for sa, sb in zip(a, b):
        for pa, pb in zip(sa.reference, sb.reference):
            assert pa.top_ids == pb.top_ids and pa.logprobs.keys() == pb.logprobs.keys()
            worst = max(worst, *(abs(pa.logprobs[t] - pb.logprobs[t]) for t in pa.logprobs))
    assert worst < 1e-5, worst
    # Its noise floor would run the offloaded layers from fp32 weights: refused, saying why.
    with pytest.raises(ShadowReferenceError, match="offloads"):
        split.enable_noise_floor("bfloat16")
    split.enable_noise_floor("float32")  # the fp32 rows themselves: nothing to copy


def test_settings_check_the_memory_flag():
    from pydantic import ValidationError

    from server.reference_app import ReferenceSettings

    with pytest.raises(ValidationError, match="DEVICE=SIZE"):
        ReferenceSettings(model="x", max_memory="cpu")
