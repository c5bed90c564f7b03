"""Completions `echo` + `prompt_logprobs` + `max_tokens: 0` (vLLM's prompt scoring) on both
engines, against log-probs computed here with transformers (fp32) for the same ids."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration

PROMPTS = ["The capital of France is Paris, and the capital of Italy is", "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def teacher_forced(demo_model, tokenizer):
    """Independent: log-softmax of the fp32 model's logits at every prompt position."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model, torch_dtype=torch.float32).eval()
    out = {}
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt)
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            out[prompt] = (ids, logprobs)
    return out


def complete(server, **body) -> dict:
    reply = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, **body}, headers=server.headers,
                       timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.parametrize("server_name", ["vllm_server", "hf_server"])
def test_echo_and_prompt_logprobs_match_transformers(request, server_name, teacher_forced, tokenizer):
    server = request.getfixturevalue(server_name)
    reply = complete(server, prompt=PROMPTS, max_tokens=0, echo=True, logprobs=3, prompt_logprobs=3)
    assert reply["usage"]["completion_tokens"] == 0
    for choice, prompt in zip(reply["choices"], PROMPTS):
        ids, expected = teacher_forced[prompt]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        echo = choice["logprobs"]
        assert echo["tokens"] == [tokenizer.decode([i]) for i in ids]
        assert echo["token_logprobs"][0] is None and echo["top_logprobs"][0] is None
        scored = choice["prompt_logprobs"]
        assert scored[0] is None and len(scored) == len(ids)
        worst = 0.0
        for pos in range(1, len(ids)):
            # The prompt's own token, predicted from the positions before it.
            want = expected[pos - 1, ids[pos]].item()
            worst = max(worst, abs(echo["token_logprobs"][pos] - want), abs(scored[pos][str(ids[pos])]["logprob"] - want))
            top = torch.topk(expected[pos - 1], 3)
            assert [int(t) for t in scored[pos] if scored[pos][t]["rank"] is not None] == top.indices.tolist()
            for t, lp in zip(top.indices.tolist(), top.values.tolist()):
                worst = max(worst, abs(scored[pos][str(t)]["logprob"] - lp))
        assert worst < 1e-3, f"max |Δlogprob| {worst:.2e} on {server_name}"


def test_echo_prefixes_the_generated_text_and_its_logprobs(vllm_server):
    plain = complete(vllm_server, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=1)["choices"][0]
    echoed = complete(vllm_server, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=1, echo=True)["choices"][0]
    assert echoed["text"] == PROMPTS[0] + plain["text"]
    generated = len(plain["logprobs"]["tokens"])
    assert echoed["logprobs"]["tokens"][-generated:] == plain["logprobs"]["tokens"]
    assert echoed["logprobs"]["token_logprobs"][-generated:] == pytest.approx(plain["logprobs"]["token_logprobs"])
    offsets = echoed["logprobs"]["text_offset"]
    assert offsets == sorted(offsets) and offsets[-generated] >= len(PROMPTS[0]) - 1
