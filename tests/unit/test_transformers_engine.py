"""The transformers engine on a tiny random Llama with SmolLM2's tokenizer.

Its cached decode loop is checked against an independent computation: a full forward
over the whole sequence at every step, without a cache.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engines import SamplingOptions
from server.engines.transformers_engine import TransformersEngine, _sample, _StopAwareText


@pytest.fixture(scope="module")
def engine(tokenizer) -> TransformersEngine:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
    )
    return TransformersEngine(LlamaForCausalLM(config), tokenizer, max_model_len=256)


def run(engine, prompt, options):
    async def go():
        return [chunk async for chunk in engine.generate(prompt, options, "t")]

    return asyncio.run(go())


def test_greedy_tokens_and_raw_logprobs_match_a_full_forward(engine):
    prompt = [1, 520, 9531, 198]
    chunks = run(engine, prompt, SamplingOptions(max_tokens=6, temperature=0, logprobs=3))
    tokens = [t for c in chunks for t in c.token_ids]
    assert chunks[-1].finish_reason in ("stop", "length")
    sequence = list(prompt)
    for chunk, token in zip(chunks, tokens):
        with torch.no_grad():
            logits = engine._model(torch.tensor([sequence])).logits[0, -1]
        reference = torch.log_softmax(logits.double(), -1)
        assert token == int(torch.argmax(reference))
        entry = chunk.logprobs[0]
        assert len(entry) == 3 and set(entry) == set(torch.topk(reference, 3).indices.tolist())
        for token_id, logprob in entry.items():
            assert logprob == pytest.approx(float(reference[token_id]), abs=1e-5)
        sequence.append(token)


def test_a_vanishing_temperature_is_greedy_not_a_crash(engine):
    """8.1e-126 (found by the fuzzer) overflowed the softmax to nan; vLLM samples greedily
    below 1e-5, and so do we."""
    prompt = [1, 520, 9531, 198]
    greedy = run(engine, prompt, SamplingOptions(max_tokens=4, temperature=0))
    tiny = run(engine, prompt, SamplingOptions(max_tokens=4, temperature=8.1e-126, seed=3))
    assert [c.token_ids for c in tiny] == [c.token_ids for c in greedy]


def test_logprobs_stay_raw_under_temperature_and_penalties(engine):
    prompt = [1, 520, 9531, 198]
    options = SamplingOptions(max_tokens=5, temperature=1.7, presence_penalty=2.0, frequency_penalty=1.0, seed=1, logprobs=5)
    chunks = run(engine, prompt, options)
    tokens = [c.token_ids[0] for c in chunks]
    assert len(tokens) >= 3  # penalties act from the second token on
    for i, chunk in enumerate(chunks):
        with torch.no_grad():
            raw = torch.log_softmax(engine._model(torch.tensor([prompt + tokens[:i]])).logits[0, -1].double(), -1)
        entry = chunk.logprobs[0]
        assert set(entry) >= set(torch.topk(raw, 5).indices.tolist())
        for token_id, logprob in entry.items():
            assert logprob == pytest.approx(float(raw[token_id]), abs=1e-5)


def test_seed_repeats_and_length_is_respected(engine):
    options = SamplingOptions(max_tokens=5, temperature=1.0, seed=42)
    first = [t for c in run(engine, [1, 2, 3], options) for t in c.token_ids]
    assert first == [t for c in run(engine, [1, 2, 3], options) for t in c.token_ids]
    assert len(first) <= 5


def test_closing_the_stream_stops_the_worker(engine):
    async def go():
        stream = engine.generate([1, 2, 3], SamplingOptions(max_tokens=200, temperature=1.0, seed=0), "t")
        await anext(stream)
        await stream.aclose()
        # The worker is free again: a new request is served at once.
        return [c async for c in engine.generate([1, 2], SamplingOptions(max_tokens=2, temperature=0), "u")]

    assert 1 <= len(asyncio.run(asyncio.wait_for(go(), timeout=30))) <= 2


def test_sampling_rules():
    logits = torch.tensor([3.0, 2.9, -5.0])
    gen = torch.Generator().manual_seed(0)
    assert _sample(logits, [], [], SamplingOptions(max_tokens=1, temperature=0), gen) == 0
    # top_p smaller than the top token's probability keeps only the top token.
    assert {_sample(logits, [], [], SamplingOptions(max_tokens=1, top_p=0.1), gen) for _ in range(50)} == {0}
    # A frequency penalty on an already generated token pushes the choice elsewhere.
    assert _sample(logits, [], [0, 0], SamplingOptions(max_tokens=1, temperature=0, frequency_penalty=1.0), gen) == 1


def test_vllm_sampling_extensions():
    logits = torch.tensor([3.0, 2.9, 1.0, -5.0])
    gen = torch.Generator().manual_seed(0)
    draws = lambda options, n=200: {_sample(logits, [], [], options, gen) for _ in range(n)}  # noqa: E731
    # top_k 2: only the two likeliest ever drawn; top_k 0: all but the very unlikely.
    assert draws(SamplingOptions(max_tokens=1, top_k=2)) == {0, 1}
    assert draws(SamplingOptions(max_tokens=1, top_k=0), 2000) >= {0, 1, 2}
    # min_p 0.5: p(1)/p(0) = e^-0.1 = 0.90 stays, p(2)/p(0) = e^-2 = 0.14 goes.
    assert draws(SamplingOptions(max_tokens=1, min_p=0.5)) == {0, 1}
    # Repetition penalty 2 on token 0 (prompt) halves its positive logit: 1.5 < 2.9.
    assert _sample(logits, [0], [], SamplingOptions(max_tokens=1, temperature=0, repetition_penalty=2.0), gen) == 1
    # Below 1 it rewards repeats: token 1 (output) goes from 2.9 to 2.9 / 0.1 = 29.
    assert _sample(logits, [], [1], SamplingOptions(max_tokens=1, temperature=0, repetition_penalty=0.1), gen) == 1
    # Banned ids (EOS before min_tokens) are never drawn, even greedily.
    assert _sample(logits, [], [], SamplingOptions(max_tokens=1, temperature=0), gen, banned=[0]) == 1


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer.encode("Hello world. Next line")
    text = _StopAwareText(tokenizer, (". Ne",))
    streamed = "".join(text.add(ids[:n], check_stops=False)[0] for n in range(1, len(ids) + 1))
    assert streamed + text.finish() == "Hello world. Next line"


def test_stop_strings_truncate_and_are_never_streamed(tokenizer):
    ids = tokenizer.encode("Hello world. Next line")
    text = _StopAwareText(tokenizer, (". Ne",))
    streamed, hit = "", False
    for n in range(1, len(ids) + 1):
        piece, hit = text.add(ids[:n])
        streamed += piece
        assert ". Ne" not in streamed
        if hit:
            break
    assert hit and streamed == "Hello world"


def test_text_without_stops_streams_whole(tokenizer):
    ids = tokenizer.encode("Grüße, 世界!")
    text = _StopAwareText(tokenizer, ())
    streamed = "".join(text.add(ids[:n])[0] for n in range(1, len(ids) + 1)) + text.finish()
    assert streamed == "Grüße, 世界!"
