"""Teacher-forced scoring vs an independent computation: one forward pass per prefix."""

from __future__ import annotations

import json

import pytest
import torch

from shadow.local_scorer import LocalScorer
from shadow.remote_code import RemoteCodeError, local_code_only
from shadow.scoring import (
    ScoreItem,
    ShadowReferenceError,
    VocabInfo,
    check_same_vocab,
    vocab_fingerprint,
)
from tests.scorers import tiny_local_scorer


@pytest.fixture(scope="module")
def scorer(tokenizer) -> LocalScorer:
    return tiny_local_scorer(tokenizer, seed=1)


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
    for item, scored in zip(ITEMS, stats):
        assert scored.noise is None
        for ids, got, want in zip(item.candidate_ids, scored.reference, step_by_step(scorer._model, item)):
            assert list(got.logprobs) == ids
            for t in ids:
                assert got.logprobs[t] == pytest.approx(float(want[t]), abs=1e-5)
            assert got.top_ids == torch.topk(want, 3).indices.tolist()
            assert got.top_logprobs == pytest.approx(torch.topk(want, 3).values.tolist(), abs=1e-5)


def test_batching_with_padding_changes_nothing(scorer):
    together = scorer.score_sync(ITEMS, top_m=2)
    alone = [scorer.score_sync([item], top_m=2)[0] for item in ITEMS]
    for a, b in zip(together, alone):
        for p, q in zip(a.reference, b.reference):
            assert p.top_ids == q.top_ids
            assert list(p.logprobs.values()) == pytest.approx(list(q.logprobs.values()), abs=1e-5)


def test_trust_remote_code_only_for_local_code(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert local_code_only(tmp_path) is False
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    with pytest.raises(RemoteCodeError, match="not in the directory"):
        local_code_only(tmp_path)
    (tmp_path / "modeling_x.py").write_text("")
    assert local_code_only(tmp_path) is True
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "someone/repo--modeling_x.X"}}))
    with pytest.raises(RemoteCodeError, match="outside the directory"):
        local_code_only(tmp_path)


def test_vocabulary_mismatch_is_refused(tokenizer):
    mine = vocab_fingerprint(tokenizer)
    assert mine.size == 49152 and len(mine.sha256) == 64
    check_same_vocab(mine, mine, "ref")
    with pytest.raises(ShadowReferenceError, match="does not share the candidate's tokenizer"):
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
        for p, q in zip(a.reference, b.reference):
            assert p.top_ids == q.top_ids
            assert list(p.logprobs.values()) == pytest.approx(list(q.logprobs.values()), abs=1e-5)


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


def test_noise_floor_matches_a_bf16_model_run_independently(scorer, tokenizer):
    """The serving-dtype pass against an independent bf16 copy (plain `.to(bfloat16)`,
    PyTorch's native bf16 kernels, one prefix at a time): the same top-k and log-probs
    within bf16 kernel differences, while fp32 and bf16 really differ."""
    import copy

    noisy = LocalScorer(scorer._model, tokenizer, "tiny", torch.device("cpu"))
    noisy.enable_noise_floor("bfloat16")
    assert next(noisy._noise_model.parameters()).dtype == torch.bfloat16
    assert next(scorer._model.parameters()).dtype == torch.float32  # the reference itself is untouched
    bf16 = copy.deepcopy(scorer._model).to(torch.bfloat16)
    scored = noisy.score_sync(ITEMS, top_m=3, noise_top_k=4)
    largest_gap = 0.0
    for item, result in zip(ITEMS, scored):
        fp32_rows = step_by_step(scorer._model, item)
        for i, (ids, bf16_row, fp32_row) in enumerate(zip(item.candidate_ids, step_by_step(bf16, item), fp32_rows)):
            noise, ref = result.noise[i], result.reference[i]
            assert item.output_ids[i] in noise  # the emitted token, for Δp
            assert set(torch.topk(bf16_row, 4).indices.tolist()) <= set(noise)
            for t, lp in noise.items():
                assert lp == pytest.approx(float(bf16_row[t]), abs=2e-2)
                assert ref.logprobs[t] == pytest.approx(float(fp32_row[t]), abs=1e-5)  # fp32 at the noise ids
                largest_gap = max(largest_gap, abs(lp - float(fp32_row[t])))
            assert list(ref.logprobs)[: len(ids)] == ids
    assert largest_gap > 1e-3  # the noise floor is not the fp32 reference in disguise


def test_an_fp32_noise_floor_is_the_reference_itself(scorer, tokenizer):
    from shadow.compare import compare_sequence

    exact = LocalScorer(scorer._model, tokenizer, "tiny", torch.device("cpu"))
    exact.enable_noise_floor("float32")
    assert exact._noise_model is None
    for item, result in zip(ITEMS, exact.score_sync(ITEMS, top_m=3, noise_top_k=4)):
        same = compare_sequence(item.output_ids, result.noise, result.reference, 0.25)
        assert same.result == "identical" and same.tokens.kl.max() == 0.0


def test_noise_floor_needs_enabling_and_a_known_dtype(scorer, tokenizer):
    with pytest.raises(ShadowReferenceError, match="not enabled"):
        scorer.score_sync(ITEMS, top_m=3, noise_top_k=4)
    with pytest.raises(ShadowReferenceError, match="no noise floor for dtype 'float8'"):
        LocalScorer(scorer._model, tokenizer, "tiny", torch.device("cpu")).enable_noise_floor("float8")
