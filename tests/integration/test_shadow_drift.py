"""The shadow path on SmolLM2 with the real vLLM engine, read back from /metrics.

- bf16 candidate vs fp32 reference, same weights: precision noise only, so no `hard`
  divergence over 20 prompts x 64 tokens, and a small KL.
- A broken candidate (same weights, rope theta 10000 instead of 100000 in its config,
  the kind of conversion bug DESIGN.md cites): `hard` divergences early for most
  prompts, and a mean token KL at least 10x the bf16 case.
- fp32 candidate vs fp32 reference: the pipeline itself is exact.
- Shadowing changes nothing a client receives.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL_NAME
from tests.servers import RunningServer, start_server

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
VLLM_ARGS = ["--engine", "vllm", "--enforce-eager", "true", "--max-model-len", "2048", "--kv-cache-gib", "1"]


def shadow_server(model: Path, tmp: Path, reference: Path, dtype: str = "bfloat16") -> RunningServer:
    return start_server(
        ["--model", str(model), "--served-model-name", MODEL_NAME, "--dtype", dtype, *VLLM_ARGS,
         "--shadow-rate", "1.0", "--shadow-reference-model", str(reference),
         "--shadow-capture-path", str(tmp / "divergences.jsonl")],
        tmp / "server.log",
    )


@pytest.fixture(scope="module")
def broken_candidate(demo_model: Path, tmp_path_factory) -> Path:
    """The demo weights under a config with the wrong rope theta (weights symlinked)."""
    out = tmp_path_factory.mktemp("broken-rope")
    for item in demo_model.iterdir():
        if item.name != "config.json":
            (out / item.name).symlink_to(item)
    config = json.loads((demo_model / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 10000.0
    (out / "config.json").write_text(json.dumps(config))
    return out


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


def run_and_read(server: RunningServer, prompts=PROMPTS) -> dict:
    # One at a time: the batch composition (and so bf16 rounding) is the same every run.
    with ThreadPoolExecutor(1) as pool:
        list(pool.map(lambda p: chat(server, p), prompts))
    deadline = time.monotonic() + 300
    while True:
        samples = metric_samples(server)
        done = total(samples, "shadow_samples_total", outcome="compared") + total(samples, "shadow_samples_total", outcome="error")
        if done >= len(prompts) or time.monotonic() > deadline:
            break
        time.sleep(1)
    kl_count = total(samples, "shadow_token_kl_divergence_count")
    return {
        "compared": total(samples, "shadow_samples_total", outcome="compared"),
        "errors": total(samples, "shadow_samples_total", outcome="error"),
        "identical": total(samples, "shadow_sequences_total", result="identical"),
        "near_tie": total(samples, "shadow_sequences_total", result="near_tie"),
        "hard": total(samples, "shadow_sequences_total", result="hard"),
        "diverged_by_16": total(samples, "shadow_first_divergence_position_tokens_bucket", le="16.0"),
        "tokens": kl_count,
        "mean_kl": total(samples, "shadow_token_kl_divergence_sum") / kl_count,
        "same_top1": total(samples, "shadow_tokens_total", top1="same") / kl_count,
        "mean_drift": total(samples, "shadow_token_logprob_drift_sum") / kl_count,
    }


def captured(server: RunningServer) -> list[dict]:
    path = server.log_path.parent / "divergences.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def report(label: str, figures: dict, records: list[dict]) -> None:
    positions = sorted(r["first_divergence"] for r in records)
    margins = sorted(round(r["margin"], 3) for r in records)
    print(f"\n[{label}] {json.dumps(figures)}\n[{label}] first divergences {positions}, margins {margins}")


@pytest.fixture(scope="module")
def bf16_figures(demo_model, tmp_path_factory):
    server = shadow_server(demo_model, tmp_path_factory.mktemp("bf16"), reference=demo_model)
    try:
        figures = run_and_read(server)
        report("bf16 vs fp32", figures, captured(server))
        return figures
    finally:
        server.stop()


def test_bf16_candidate_shows_only_precision_noise(bf16_figures):
    f = bf16_figures
    assert f["compared"] == len(PROMPTS) and f["errors"] == 0
    assert f["hard"] == 0
    assert f["mean_kl"] < 5e-3
    assert f["same_top1"] > 0.95


def test_broken_rope_theta_is_a_hard_early_divergence(broken_candidate, demo_model, bf16_figures, tmp_path_factory):
    server = shadow_server(broken_candidate, tmp_path_factory.mktemp("broken"), reference=demo_model)
    try:
        f = run_and_read(server)
        report("rope theta 1e4 vs fp32", f, captured(server))
    finally:
        server.stop()
    assert f["compared"] == len(PROMPTS)
    assert f["hard"] > len(PROMPTS) / 2
    assert f["diverged_by_16"] > len(PROMPTS) / 2
    assert f["mean_kl"] >= 10 * bf16_figures["mean_kl"]


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
