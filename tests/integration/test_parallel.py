"""A split candidate (issue 11) on vLLM's CPU backend, with the shadow on every request:
`--pipeline-parallel-size 2` (two worker processes, 15 of SmolLM2's 30 layers each,
compiled: eager is refused for a pipeline on CPU) and `--tensor-parallel-size 3` (three
worker processes, 3 of the 9 query heads and 1 of the 3 KV heads each, eager; on a
2-core host two ranks share a core). The official client gets the same greedy tokens as
transformers' own fp32 model, and the shadow finds each split as exact as the unsplit
deployment (test_shadow_drift's bound): a split that lost or reordered a stage or a
shard would show here as hard divergences and KL."""

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


def rank_cpus(ranks: int) -> str:
    """vLLM's CPU workers pin OpenMP threads per rank (auto-binding wants one NUMA node per
    rank): the host's CPUs dealt out in `ranks` contiguous parts, the last ones shared
    when there are fewer CPUs than ranks."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("a split across processes needs at least two CPUs")
    parts = [cpus[i * len(cpus) // ranks:(i + 1) * len(cpus) // ranks] or [cpus[min(i, len(cpus) - 1)]]
             for i in range(ranks)]
    return "|".join(",".join(map(str, part)) for part in parts)


# name -> (processes, the flags that split, the worker-log prefix and vLLM's config line)
LAYOUTS = {
    "pp2": (2, ["--pipeline-parallel-size", "2", "--enforce-eager", "false"], "(Worker_PP", "pipeline_parallel_size=2"),
    "tp3": (3, ["--tensor-parallel-size", "3", "--enforce-eager", "true"], "(Worker_TP", "tensor_parallel_size=3"),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def split_server(layout, demo_model, tmp_path_factory) -> RunningServer:
    ranks, flags, _, _ = LAYOUTS[layout]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", rank_cpus(ranks))
        patch.setenv("VLLM_LOGGING_LEVEL", "INFO")  # the layout check reads vLLM's start-up lines
        server = start_server(
            ["--model", str(demo_model), "--dtype", "float32", "--max-model-len", "1024", "--kv-cache-gib", "1",
             *flags, "--distributed-executor-backend", "mp", "--shadow-rate", "1"],
            tmp_path_factory.mktemp(layout) / "server.log", api_key=API_KEY, timeout=600,
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


def test_the_engine_really_runs_split(split_server, layout):
    ranks, _, prefix, config = LAYOUTS[layout]
    log = split_server.log_path.read_text()
    assert config in log, split_server.log_tail()
    pids = {line.split("pid=")[1].split(")")[0] for line in log.splitlines() if line.startswith(prefix)}
    assert len(pids) == ranks, f"expected {ranks} worker processes, saw {pids}"


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


def test_the_shadow_finds_the_split_exact(split_server, layout):
    """After the traffic above (8 chats, every one sampled): no hard divergence, and the
    mean token KL under the bound the unsplit fp32 deployment meets (< 1e-6)."""
    deadline = time.monotonic() + 300
    while shadow_total(split_server, "shadow_samples_total", outcome="compared") < 2 * len(PROMPTS):
        assert shadow_total(split_server, "shadow_samples_total", outcome="error") == 0
        assert time.monotonic() < deadline, "the shadow did not compare every sampled chat in time"
        time.sleep(0.5)
    tokens = shadow_total(split_server, "shadow_token_kl_divergence_count")
    kl = shadow_total(split_server, "shadow_token_kl_divergence_sum")
    print(f"\n[{layout} fp32 vs fp32] tokens {tokens:.0f}, mean KL {kl / tokens:.2e}")
    assert shadow_total(split_server, "shadow_sequences_total", result="hard") == 0
    assert tokens >= 2 * len(PROMPTS) and kl / tokens < 1e-6
