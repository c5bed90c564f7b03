"""A reference is checked before anything is judged against it: remote code that fails
under this transformers is explained (file, line, version, ways out), and a reference
that computes garbage — InternLM2's released rotary tables never materialised — is
refused by the probe, never turned into a `fail` for the candidate. Real SmolLM2 weights
behind test-written remote code (tests/remote_code.py)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
import transformers

from server.engines.transformers_engine import TransformersEngine
from server.serving.prompts import PromptRenderer
from shadow.local_scorer import LocalScorer
from shadow.reference_check import MAX_EXCESS_NATS, PROBE, check_reference, judge_reference
from shadow.remote_code import RemoteCodeFailedError
from tests import candidates
from tests.remote_code import broken_remote_code_dir


def test_judge_reference_refuses_only_a_reference_worse_than_its_candidate():
    cand = np.full(100, -2.0)
    same = judge_reference(cand + 1e-3, cand, MAX_EXCESS_NATS)
    assert same.trusted and same.reasons == [] and math.isclose(same.excess_nats, -1e-3, abs_tol=1e-12)
    assert math.isclose(same.reference_perplexity, math.exp(2 - 1e-3))
    broken_candidate = judge_reference(cand, cand - 3.0, MAX_EXCESS_NATS)  # the candidate is the worse side
    assert broken_candidate.trusted
    bad = judge_reference(cand - 1.0, cand, MAX_EXCESS_NATS)
    assert not bad.trusted and "far worse than its candidate" in bad.reasons[0]
    assert "probe perplexity: reference 20.09, candidate 7.389 over 100 tokens" in bad.summary()
    nan = judge_reference(np.where(np.arange(100) == 5, np.nan, cand), cand, MAX_EXCESS_NATS)
    assert not nan.trusted and nan.reference_perplexity is None and "not finite" in nan.reasons[0]
    unmaterialised = judge_reference(cand, cand, MAX_EXCESS_NATS, ["buffer rotary.inv_freq was never materialised"])
    assert not unmaterialised.trusted and unmaterialised.reasons == ["reference buffer rotary.inv_freq was never materialised"]


def test_remote_code_that_fails_is_explained(demo_model, tmp_path):
    broken = broken_remote_code_dir(demo_model, tmp_path / "rope", "rope_type")
    for load in (lambda: LocalScorer.load(broken, device="cpu", trust_remote_code=True),
                 lambda: TransformersEngine.load(broken, dtype="float32", trust_remote_code=True)):
        with pytest.raises(RemoteCodeFailedError) as caught:
            load()
        message = str(caught.value)
        assert "modeling_broken.py, line 13, in __init__" in message
        assert f"under transformers {transformers.__version__}" in message
        assert "KeyError: 'type'" in message and "shadowserve convert" in message and "--shadow-reference-url" in message
    PromptRenderer.load(broken, trust_remote_code=True)  # its tokenizer is transformers' own: unaffected


@pytest.fixture(scope="module")
def demo_scorer(demo_model) -> LocalScorer:
    return LocalScorer.load(demo_model, device="cpu")


@pytest.fixture(scope="module")
def probe(demo_model) -> list[int]:
    return PromptRenderer.load(demo_model).text(PROBE)


def logprobs_of(scorer: LocalScorer):
    """A candidate's next-token log-probs from a model in process (the engine's role)."""
    async def run(ids: list[int]) -> list[float]:
        with torch.inference_mode():
            rows = torch.log_softmax(scorer._model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
        return rows[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    return run


def test_unmaterialised_rotary_tables_are_refused_with_both_perplexities(demo_model, demo_scorer, probe, tmp_path):
    """The released InternLM2 rotary pattern under transformers 5: the tables are left as
    whatever memory held. Both ways it goes are refused: finite garbage (here: zeros, as
    seen in the issue) by the probe, non-finite by the integrity check."""
    reference = LocalScorer.load(broken_remote_code_dir(demo_model, tmp_path / "rotary", "cached_rotary"),
                                 device="cpu", trust_remote_code=True)
    rotary = reference._model.model.rotary_emb
    for buffer in (rotary.inv_freq, rotary.cos_cached, rotary.sin_cached):
        buffer.zero_()
    reference.integrity_problems = []
    check = asyncio.run(check_reference(reference, logprobs_of(demo_scorer), [probe]))
    assert not check.trusted and check.excess_nats > 1, check
    assert check.reference_perplexity > 10 * check.candidate_perplexity
    assert f"probe perplexity: reference {check.reference_perplexity:.4g}, candidate " \
           f"{check.candidate_perplexity:.4g} over {len(probe) - 1} tokens" in check.summary()

    rotary.cos_cached.fill_(float("nan"))
    from shadow.local_scorer import integrity_problems

    reference.integrity_problems = integrity_problems(reference._model)
    assert reference.integrity_problems == ["buffer model.rotary_emb.cos_cached holds non-finite values"]
    check = asyncio.run(check_reference(reference, logprobs_of(demo_scorer), [probe]))
    assert not check.trusted and check.reasons[0] == "reference buffer model.rotary_emb.cos_cached holds non-finite values"


def test_a_sound_reference_is_trusted_against_a_broken_or_low_precision_candidate(demo_model, demo_scorer, probe, tmp_path):
    broken = LocalScorer.load(candidates.kv_swapped(demo_model, tmp_path / "kv"), device="cpu")
    check = asyncio.run(check_reference(demo_scorer, logprobs_of(broken), [probe]))
    assert check.trusted and check.excess_nats < -1, check  # the candidate is far worse: its problem, not the reference's
    bf16 = LocalScorer.load(demo_model, device="cpu")
    bf16._model = bf16._model.to(torch.bfloat16)
    check = asyncio.run(check_reference(demo_scorer, logprobs_of(bf16), [probe]))
    assert check.trusted and abs(check.excess_nats) < 0.02, check  # precision moves it by ~1e-3 nats/token


def test_a_sentencepiece_vocabulary_is_read_without_remote_code(tmp_path):
    """InternLM2 ships `tokenizer.model` behind a remote-code tokenizer class: the vocabulary
    check reads the sentencepiece pieces and the config's added tokens directly."""
    import io
    import json

    import sentencepiece

    from adapters.native.vocab import load_vocab

    model = io.BytesIO()
    lines = ["The old lighthouse stood at the edge of the cliff.", "Ships passing in the night saw its beam."] * 50
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=60,
                                             model_type="bpe", bos_id=1, eos_id=2, unk_id=0)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": {"60": {"content": "<|im_end|>"}}, "pad_token": "</s>"}))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    vocab = load_vocab(tmp_path)
    assert len(vocab) == 61 and vocab.get_vocab()["<|im_end|>"] == 60
    assert all(vocab.get_vocab()[sp.id_to_piece(i)] == i for i in range(60))
    assert vocab.pad_token_id == 2 and vocab.encode("The cliff") == [1, *sp.encode("The cliff")]


def test_the_shadow_path_judges_nothing_against_a_refused_reference():
    """Samples taken while the check runs are skipped once it fails; after it, nothing is
    sampled; the report is `inconclusive`, refused, with the check's figures. A check
    that cannot run is retried (the server) or raised (verify)."""
    import random

    from prometheus_client import CollectorRegistry

    from shadow.metrics import ShadowMetrics
    from shadow.path import ShadowPath
    from shadow.settings import ShadowSettings
    from tests.scorers import EchoScorer, outcome, sample

    bad = judge_reference(np.full(50, -6.0), np.full(50, -2.0), MAX_EXCESS_NATS)
    calls = []

    async def flaky_then_bad():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("reference restarting")
        await asyncio.sleep(0.05)
        return bad

    async def scenario():
        scorer = EchoScorer()
        path = ShadowPath(ShadowSettings(shadow_rate=1.0), scorer, ShadowMetrics(CollectorRegistry(), "cand", "echo"),
                          rng=random.Random(0), self_check=flaky_then_bad)
        path.start()
        assert path.admit()
        path.submit(sample())  # queued while the check runs
        while path.reference_check is None:
            await asyncio.sleep(0.05)
        assert path.refused and not path.admit() and not path.admit("always")
        report = path.report()
        await path.stop()
        return path, scorer, report

    path, scorer, report = asyncio.run(scenario())
    assert len(calls) == 2 and scorer.batches == []  # retried once, then nothing was scored
    assert outcome(path, "skipped") == 1 and outcome(path, "compared") == 0
    assert report.verdict.status == "inconclusive" and report.verdict.reasons[0].startswith("refused to judge")
    assert report.reference_check.reference_perplexity == pytest.approx(math.exp(6))

    async def raising():
        raise ConnectionError("down")

    path = ShadowPath(ShadowSettings(shadow_rate=1.0), EchoScorer(), ShadowMetrics(CollectorRegistry(), "cand", "echo"),
                      self_check=raising)
    with pytest.raises(ConnectionError):
        asyncio.run(path.run_reference_check(retry=False))
