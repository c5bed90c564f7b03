"""vLLM fp32 and transformers fp32 on the same prompts: same greedy tokens and the same
raw top-5 log-probs. Independent evidence that both engines get the same prompt ids
and return the raw distribution (not one reshaped by the sampler)."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration

PROMPTS = [
    "Describe the city of Paris.",
    "Write a haiku about the sea.",
    "Explain what a CPU does in one sentence.",
    "List three fruits.",
    "How many legs does a spider have?",
    "Give me some tips for learning to cook.",
]


def greedy(server, prompt: str) -> tuple[dict, list]:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
        "temperature": 0,
        # Sampler settings that must not change raw log-probs at temperature 0.
        "presence_penalty": 0.0,
        "logprobs": True,
        "top_logprobs": 5,
    }
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=120).json()
    return reply["usage"], reply["choices"][0]["logprobs"]["content"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_vllm_and_transformers_agree(vllm_server, hf_server, prompt):
    vllm_usage, vllm_tokens = greedy(vllm_server, prompt)
    hf_usage, hf_tokens = greedy(hf_server, prompt)
    assert vllm_usage["prompt_tokens"] == hf_usage["prompt_tokens"]
    assert len(vllm_tokens) == len(hf_tokens) == 16
    assert [t["token"] for t in vllm_tokens] == [t["token"] for t in hf_tokens]
    worst = 0.0
    for v, h in zip(vllm_tokens, hf_tokens):
        v_top = {a["token"]: a["logprob"] for a in v["top_logprobs"]}
        h_top = {a["token"]: a["logprob"] for a in h["top_logprobs"]}
        assert v_top.keys() == h_top.keys()
        worst = max(worst, *(abs(v_top[t] - h_top[t]) for t in v_top))
    assert worst < 1e-3, f"max |Δlogprob| {worst:.2e}"


@pytest.mark.parametrize("extensions", [
    {"repetition_penalty": 1.5},  # greedy path changes: a repeating answer no longer repeats
    {"repetition_penalty": 0.7},
    # EOS barred: all 12 tokens generated (the plain answer, "2 + 2 = 4", stops after 8).
    {"min_tokens": 12, "max_tokens": 12,
     "messages": [{"role": "user", "content": "What is 2+2? Answer with a number only."}]},
    {"top_k": 1, "temperature": 1.0, "seed": 3},  # top-k 1 is greedy whatever the temperature
    {"min_p": 0.999, "temperature": 1.0, "seed": 3},  # only the likeliest token is left
])
def test_vllm_sampling_extensions_agree(vllm_server, hf_server, extensions):
    """vLLM honours its extensions; the transformers engine reimplements them: the same
    request gives the same tokens on both (and differs from the plain greedy answer where
    the extension changes the path)."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say yes."}], "max_tokens": 12,
            "temperature": 0, **extensions}

    def text(server, **override) -> tuple[str, int]:
        reply = httpx.post(f"{server.url}/v1/chat/completions", json={**body, **override}, headers=server.headers,
                           timeout=120)
        assert reply.status_code == 200, reply.text
        data = reply.json()
        return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]

    on_vllm, on_hf = text(vllm_server), text(hf_server)
    assert on_vllm == on_hf
    if "min_tokens" in extensions:
        plain = text(vllm_server, min_tokens=0)
        assert on_vllm[1] == 12 and plain[1] < 12, plain
    if "repetition_penalty" in extensions:
        assert on_vllm != text(vllm_server, repetition_penalty=1.0)
