"""Teacher-forced scoring vs an independent computation: one forward pass per prefix."""

from __future__ import annotations

import json

import pytest
import torch

from shadow.local_scorer import LocalScorer, local_code_only
from shadow.scoring import ReferenceError, ScoreItem, VocabInfo, check_same_vocab, vocab_fingerprint


@pytest.fixture(scope="module")
def scorer(tokenizer) -> LocalScorer:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LocalScorer(LlamaForCausalLM(config).eval(), tokenizer, "tiny", torch.device("cpu"))


ITEMS = [
    ScoreItem([1, 520, 9531, 198], [300, 301, 302, 2], [[300, 7], [301, 9, 10], [302], [2, 5]]),
    ScoreItem([1, 4093], [44, 45], [[44], [45, 46]]),
]


def step_by_step(model, item: ScoreItem) -> list[torch.Tensor]:
    rows = []
    for i in range(len(item.output_ids)):
        prefix = torch.tensor([item.prompt_ids + item.output_ids[:i]])
        with torch.no_grad():
            rows.append(torch.log_softmax(model(prefix).logits[0, -1].double(), -1))
    return rows


def test_teacher_forcing_matches_one_pass_per_prefix(scorer):
    stats = scorer.score_sync(ITEMS, top_m=3)
    for item, positions in zip(ITEMS, stats):
        for ids, got, want in zip(item.candidate_ids, positions, step_by_step(scorer._model, item)):
            assert list(got.candidate_logprobs) == ids
            for t in ids:
                assert got.candidate_logprobs[t] == pytest.approx(float(want[t]), abs=1e-5)
            assert got.top_ids == torch.topk(want, 3).indices.tolist()
            assert got.top_logprobs == pytest.approx(torch.topk(want, 3).values.tolist(), abs=1e-5)


def test_batching_with_padding_changes_nothing(scorer):
    together = scorer.score_sync(ITEMS, top_m=2)
    alone = [scorer.score_sync([item], top_m=2)[0] for item in ITEMS]
    for a, b in zip(together, alone):
        for p, q in zip(a, b):
            assert p.top_ids == q.top_ids
            assert list(p.candidate_logprobs.values()) == pytest.approx(list(q.candidate_logprobs.values()), abs=1e-5)


def test_trust_remote_code_only_for_local_code(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert local_code_only(tmp_path) is False
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    with pytest.raises(ReferenceError, match="not in the directory"):
        local_code_only(tmp_path)
    (tmp_path / "modeling_x.py").write_text("")
    assert local_code_only(tmp_path) is True
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "someone/repo--modeling_x.X"}}))
    with pytest.raises(ReferenceError, match="outside the directory"):
        local_code_only(tmp_path)


def test_vocabulary_mismatch_is_refused(tokenizer):
    mine = vocab_fingerprint(tokenizer)
    assert mine.size == 49152 and len(mine.sha256) == 64
    check_same_vocab(mine, mine, "ref")
    with pytest.raises(ReferenceError, match="does not share the candidate's tokenizer"):
        check_same_vocab(mine, VocabInfo(mine.size, "0" * 64), "ref")


class IgnoresLogitsToKeep(torch.nn.Module):
    """A remote-code style forward(**kwargs) that returns logits for every position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_a_model_ignoring_logits_to_keep_scores_the_same(scorer, tokenizer):
    other = LocalScorer(IgnoresLogitsToKeep(scorer._model), tokenizer, "wrapped", torch.device("cpu"))
    for a, b in zip(scorer.score_sync(ITEMS, top_m=2), other.score_sync(ITEMS, top_m=2)):
        for p, q in zip(a, b):
            assert p.top_ids == q.top_ids
            assert list(p.candidate_logprobs.values()) == pytest.approx(list(q.candidate_logprobs.values()), abs=1e-5)


def test_a_busy_reference_refuses_instead_of_queueing(scorer):
    import asyncio

    from shadow.scoring import ReferenceBusyError

    scorer._lock.acquire()  # an earlier pass (say, one that timed out) still runs
    try:
        with pytest.raises(ReferenceBusyError):
            asyncio.run(scorer.score(ITEMS, top_m=2))
    finally:
        scorer._lock.release()
    assert len(asyncio.run(scorer.score(ITEMS, top_m=2))) == 2
