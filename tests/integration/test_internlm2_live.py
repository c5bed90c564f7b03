"""The scenario the project exists for, live: an InternLM2 checkpoint converted to Llama,
served in fp32, shadowed against the InternLM2 original with no remote code — in process
on the vLLM engine, and through the remote reference service. A correct conversion in
fp32 is exact, so every compared sequence must be identical, and the self-check must have
passed with its perplexities in the verdict and the start-up log."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from tests.adapters.conftest import copy_tokenizer, internlm2_config, internlm2_state
from tests.conftest import MODEL_NAME, REFERENCE_TOKEN
from tests.servers import RunningServer, free_port, launch, start_server

pytestmark = pytest.mark.integration

PROMPTS = ("Name three rivers in Europe.", "What is 12 times 7?", "Write a haiku about the sea.",
           "Why is the sky blue?")
TOKENS = 32


@pytest.fixture(scope="module")
def original(demo_model, tmp_path_factory) -> Path:
    """InternLM2's released layout, packed by the tests' own rules from SmolLM2."""
    out = tmp_path_factory.mktemp("internlm2")
    config = json.loads((demo_model / "config.json").read_text())
    save_file(internlm2_state(load_file(demo_model / "model.safetensors"), config), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(internlm2_config(config)))
    copy_tokenizer(demo_model, out)
    return out


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory) -> Path:
    from adapters.internlm2 import convert_internlm2_to_llama

    return convert_internlm2_to_llama(original, tmp_path_factory.mktemp("converted"))


def traffic_then_report(server: RunningServer) -> dict:
    for prompt in PROMPTS:
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": TOKENS,
                "temperature": 0}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
        assert reply.status_code == 200, reply.text
    deadline = time.monotonic() + 300
    while (report := httpx.get(f"{server.url}/v1/shadow/verdict", timeout=60).json()) \
            and (report["candidate"] or {}).get("sequences", 0) < len(PROMPTS):
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    return report


def check_exact(report: dict, server: RunningServer) -> None:
    candidate = report["candidate"]
    assert candidate["identical"] == candidate["sequences"] == len(PROMPTS), candidate
    assert candidate["hard"] == candidate["near_tie"] == 0 and candidate["kl"]["mean"] < 1e-8
    check = report["reference_check"]
    assert check["trusted"] and abs(check["excess_nats"]) < 1e-4 and check["reference_perplexity"] > 1, check
    assert "passed its self-check: probe perplexity: reference" in server.log_path.read_text()


def test_the_original_as_the_local_reference_of_the_converted_model_on_vllm(converted, original, tmp_path):
    server = start_server(["--model", str(converted), "--served-model-name", MODEL_NAME, "--dtype", "float32",
                           "--enforce-eager", "true", "--max-model-len", "2048", "--kv-cache-gib", "1",
                           "--shadow-rate", "1", "--shadow-reference-model", str(original), "--log-level", "info"],
                          tmp_path / "server.log")
    try:
        report = traffic_then_report(server)
    finally:
        server.stop()
    check_exact(report, server)


def test_the_original_behind_the_remote_reference_service(converted, original, tmp_path):
    port = free_port()
    reference = launch([sys.executable, "-m", "server.cli", "reference", "--model", str(original), "--port", str(port),
                        "--tokens", REFERENCE_TOKEN, "--noise-dtype", "float32"], port, tmp_path / "reference.log",
                       api_key=REFERENCE_TOKEN)
    try:
        info = httpx.get(f"{reference.url}/v1/shadow/info", headers=reference.headers, timeout=30).json()
        assert info["loaded_as"].startswith("InternLM2, shadowserve's native forward") and info["integrity_problems"] == []
        server = start_server(["--model", str(converted), "--served-model-name", MODEL_NAME, "--engine", "transformers",
                               "--dtype", "float32", "--shadow-rate", "1", "--shadow-reference-url", reference.url,
                               "--shadow-reference-token", REFERENCE_TOKEN, "--log-level", "info"],
                              tmp_path / "server.log")
        try:
            report = traffic_then_report(server)
        finally:
            server.stop()
    finally:
        reference.stop()
    check_exact(report, server)
