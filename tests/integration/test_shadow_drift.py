"""The shadow path on SmolLM2 with the real vLLM engine, read back from /metrics:
fp32 candidate vs fp32 reference, the pipeline itself is exact (and so is its noise
floor), and shadowing changes nothing a client receives. Precision noise and real bugs,
judged against the noise floor, are in test_verify_verdicts.py."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL_NAME
from tests.servers import RunningServer

pytestmark = pytest.mark.integration

PROMPTS = [
    "Describe the city of Paris.", "Write a haiku about the sea.", "Explain what a CPU does.",
    "Give me tips for learning to cook.", "Why is the sky blue?", "Tell me about the history of Rome.",
    "How do plants make food?", "What is a black hole?", "Write a short poem about winter.",
    "Explain how vaccines work.", "What are the benefits of exercise?", "Describe a day at the beach.",
    "How does the internet work?", "What is machine learning?", "Tell me a story about a dragon.",
    "Why do we need sleep?", "Explain the water cycle.", "What makes a good friend?",
    "How do airplanes fly?", "Describe your favourite season.",
]


def chat(server: RunningServer, prompt: str, **extra) -> dict:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64, "temperature": 0, **extra}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers | extra.pop("headers", {}), timeout=300)
    assert reply.status_code == 200, reply.text
    return reply.json()


def metric_samples(server: RunningServer) -> list:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name.startswith("shadow_")]


def total(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def test_fp32_pipeline_is_exact_and_shadowing_changes_nothing_for_clients(vllm_server):
    before = metric_samples(vllm_server)
    for prompt in PROMPTS[:5]:
        plain = chat(vllm_server, prompt, headers={"X-Shadow": "never"})
        shadowed = chat(vllm_server, prompt, headers={"X-Shadow": "always"})
        assert shadowed["choices"][0]["message"] == plain["choices"][0]["message"]
        assert shadowed["usage"] == plain["usage"]
        assert shadowed.keys() == plain.keys() and shadowed["choices"][0].keys() == plain["choices"][0].keys()
        assert shadowed["choices"][0]["logprobs"] is None  # the shadow's log-probs stay server-side
        with_lp = chat(vllm_server, prompt, headers={"X-Shadow": "always"}, logprobs=True, top_logprobs=2)
        assert all(len(t["top_logprobs"]) == 2 for t in with_lp["choices"][0]["logprobs"]["content"])
    deadline = time.monotonic() + 120
    while total(after := metric_samples(vllm_server), "shadow_samples_total", outcome="compared") - \
            total(before, "shadow_samples_total", outcome="compared") < 10:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    tokens = total(after, "shadow_token_kl_divergence_count") - total(before, "shadow_token_kl_divergence_count")
    kl = total(after, "shadow_token_kl_divergence_sum") - total(before, "shadow_token_kl_divergence_sum")
    print(f"\n[fp32 vs fp32] tokens {tokens:.0f}, mean KL {kl / tokens:.2e}")
    assert total(after, "shadow_sequences_total", result="hard") == 0
    assert kl / tokens < 1e-6


def test_the_verdict_endpoint_needs_the_key_and_passes_an_exact_candidate(vllm_server):
    """After the fp32 traffic above: the noise floor of an fp32 deployment is the fp32
    reference itself (exactly 0), and the candidate sits at it."""
    assert httpx.get(f"{vllm_server.url}/v1/shadow/verdict", timeout=30).status_code == 401
    reply = httpx.get(f"{vllm_server.url}/v1/shadow/verdict", headers=vllm_server.headers, timeout=60)
    assert reply.status_code == 200, reply.text
    report = reply.json()
    assert report["noise_dtype"] == "float32"
    assert report["noise_floor"]["kl"]["mean"] == 0.0 and report["noise_floor"]["hard"] == 0
    assert report["candidate"]["sequences"] >= 10 and report["candidate"]["hard"] == 0
    assert report["verdict"]["status"] == "pass", report["verdict"]["reasons"]
    assert "ratio is taken against that floor" in " ".join(report["verdict"]["reasons"])
    bad = httpx.get(f"{vllm_server.url}/v1/shadow/verdict", params={"window": "-1"}, headers=vllm_server.headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "window"
