"""A split candidate (issue 11): `shadowserve serve --pipeline-parallel-size 2` on vLLM's
CPU backend, two worker processes each holding half of SmolLM2's 30 layers, with the
shadow on. The official client gets the same greedy tokens as transformers' own fp32
model, and the shadow finds the split exactly as exact as the unsplit deployment
(test_shadow_drift's bound): a pipeline split that lost or reordered a stage would
show here as hard divergences and KL."""

from __future__ import annotations

import os
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import API_KEY, MODEL_NAME
from tests.servers import RunningServer, start_server

pytestmark = pytest.mark.integration

PROMPTS = ["Describe the city of Paris.", "Write a haiku about the sea.", "Explain what a CPU does.",
           "How do plants make food?"]
MAX_TOKENS = 24


def stage_cpus() -> str:
    """vLLM's CPU workers pin OpenMP threads per rank (auto-binding wants one NUMA node per
    rank); the host's CPUs split in two, one half per pipeline stage."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("a two-stage pipeline needs at least two CPUs")
    half = len(cpus) // 2
    return "|".join(",".join(map(str, part)) for part in (cpus[:half], cpus[half:]))


@pytest.fixture(scope="module")
def split_server(demo_model, tmp_path_factory) -> RunningServer:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", stage_cpus())
        patch.setenv("VLLM_LOGGING_LEVEL", "INFO")  # the stage check reads vLLM's start-up lines
        server = start_server(
            ["--model", str(demo_model), "--dtype", "float32", "--enforce-eager", "false", "--max-model-len", "1024",
             "--kv-cache-gib", "1", "--pipeline-parallel-size", "2", "--distributed-executor-backend", "mp",
             "--shadow-rate", "1"],
            tmp_path_factory.mktemp("pp2") / "server.log", api_key=API_KEY, timeout=600,
        )
    yield server
    server.stop()


def shadow_total(server: RunningServer, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def transformers_model(demo_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)


def transformers_greedy(model, tokenizer, prompt: str) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_the_engine_really_runs_two_stages(split_server):
    log = split_server.log_path.read_text()
    assert "pipeline_parallel_size=2" in log, split_server.log_tail()
    ranks = {line.split("pid=")[1].split(")")[0] for line in log.splitlines() if line.startswith("(Worker_PP")}
    assert len(ranks) == 2, f"expected two pipeline worker processes, saw {ranks}"


def test_the_openai_client_gets_transformers_greedy_tokens(split_server, transformers_model, tokenizer):
    client = openai.OpenAI(base_url=f"{split_server.url}/v1", api_key=API_KEY, max_retries=0)
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0)
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
        expected = transformers_greedy(transformers_model, tokenizer, prompt)
        assert reply.choices[0].message.content == expected == streamed


def test_the_shadow_finds_the_split_exact(split_server):
    """After the traffic above (8 chats, every one sampled): no hard divergence, and the
    mean token KL under the bound the unsplit fp32 deployment meets (< 1e-6)."""
    deadline = time.monotonic() + 300
    while shadow_total(split_server, "shadow_samples_total", outcome="compared") < 2 * len(PROMPTS):
        assert shadow_total(split_server, "shadow_samples_total", outcome="error") == 0
        assert time.monotonic() < deadline, "the shadow did not compare every sampled chat in time"
        time.sleep(0.5)
    tokens = shadow_total(split_server, "shadow_token_kl_divergence_count")
    kl = shadow_total(split_server, "shadow_token_kl_divergence_sum")
    print(f"\n[pp=2 fp32 vs fp32] tokens {tokens:.0f}, mean KL {kl / tokens:.2e}")
    assert shadow_total(split_server, "shadow_sequences_total", result="hard") == 0
    assert tokens >= 2 * len(PROMPTS) and kl / tokens < 1e-6
