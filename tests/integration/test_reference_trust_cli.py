"""The two ways InternLM2's released code fails under transformers 5, reproduced by remote
code written in tests/remote_code.py on real SmolLM2 weights, as a user meets them through
`verify` and `serve`: the crash is explained and exits 2; the silent garbage is refused by
the self-check (exit 2 with both perplexities; a server keeps serving, samples nothing
and its verdict says why), never turned into a `fail` against the candidate."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import MODEL_NAME
from tests.remote_code import broken_remote_code_dir
from tests.servers import free_port, start_server
from tests.verify_cli import CORPUS, FAST, run_verify

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def broken(demo_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-code")
    return {failure: broken_remote_code_dir(demo_model, root / failure, failure) for failure in ("rope_type", "cached_rotary")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


def test_verify_explains_remote_code_that_crashes(demo_model, broken, corpus):
    run = run_verify(str(demo_model), str(broken["rope_type"]), "--trust-remote-code", "true", "--corpus", str(corpus), *FAST)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "RemoteCodeFailedError" in run.stderr and "modeling_broken.py, line 13" in run.stderr
    assert "KeyError: 'type'" in run.stderr and "under transformers 5." in run.stderr


def test_serve_says_the_reference_failed_not_the_engine(demo_model, broken, tmp_path):
    port = free_port()
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(demo_model), "--engine", "transformers",
         "--port", str(port), "--shadow-rate", "1", "--shadow-reference-model", str(broken["rope_type"]),
         "--trust-remote-code", "true"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "shadowserve serve: the reference failed to load:" in run.stderr
    assert "engine failed to load" not in run.stderr and "modeling_broken.py, line 13" in run.stderr


def test_verify_refuses_a_reference_that_computes_garbage(demo_model, broken, corpus):
    run = run_verify(str(demo_model), str(broken["cached_rotary"]), "--trust-remote-code", "true", "--corpus", str(corpus),
                     *FAST)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "ReferenceUntrustedError: refusing to judge the candidate against" in run.stderr
    # Finite garbage fails the perplexity rule, non-finite garbage the integrity check; both print the figures.
    assert "probe perplexity: reference " in run.stderr and ", candidate " in run.stderr
    assert "Verdict" not in run.stdout


def test_a_server_with_a_broken_reference_serves_and_refuses_to_judge(demo_model, broken, tmp_path):
    server = start_server(["--model", str(demo_model), "--served-model-name", MODEL_NAME, "--engine", "transformers",
                           "--dtype", "float32", "--shadow-rate", "1", "--shadow-reference-model",
                           str(broken["cached_rotary"]), "--trust-remote-code", "true"], tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 120
        while (report := httpx.get(f"{server.url}/v1/shadow/verdict", timeout=30).json())["reference_check"] is None:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.5)
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
        report = httpx.get(f"{server.url}/v1/shadow/verdict", timeout=30).json()
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()
    check = report["reference_check"]
    assert check["trusted"] is False and check["candidate_perplexity"] > 1
    assert report["verdict"]["status"] == "inconclusive" and report["verdict"]["reasons"][0].startswith("refused to judge")
    assert report["candidate"] is None  # nothing was sampled, nothing compared
    sampled = [line for line in metrics.splitlines() if line.startswith("shadow_sampled_total{")]
    assert sampled and all(line.endswith(" 0.0") for line in sampled), sampled  # the chat was not sampled
    log = server.log_path.read_text()
    assert "REFUSING to judge against the reference" in log and "probe perplexity: reference" in log
