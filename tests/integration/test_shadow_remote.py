"""The remote reference service gives the same statistics as the local scorer, and a
server using it compares live traffic. (A reference that does not fit its candidate:
test_reference_refusals.py.)"""

from __future__ import annotations

import asyncio
import shutil
import time
from importlib.metadata import version

import httpx
import pytest

from shadow.calibration import Calibration, EngineFacts
from shadow.local_scorer import LocalScorer
from shadow.remote_scorer import RemoteScorer
from shadow.scoring import ScoreItem, ShadowReferenceError
from tests.conftest import MODEL_NAME, REFERENCE_TOKEN
from tests.servers import start_server

pytestmark = pytest.mark.integration


def items(tokenizer) -> list[ScoreItem]:
    prompt = tokenizer.encode("The capital of France is")
    output = tokenizer.encode(" Paris, a city on the Seine.")
    other = tokenizer.encode("Once upon a time")
    return [
        ScoreItem(prompt, output, [[t, (t + 1) % 49152, 42] for t in output]),
        ScoreItem(other, [11, 12, 13], [[11], [12, 5], [13, 99, 100]]),
    ]


def test_remote_and_local_scorers_agree(reference_server, demo_model, tokenizer):
    local = LocalScorer.load(demo_model, device="cpu")
    remote = RemoteScorer.connect(reference_server.url, REFERENCE_TOKEN, timeout=60)
    assert (remote.name, remote.vocab) == (local.name, local.vocab)
    assert remote.info.noise_dtype == "bfloat16"  # the service's default: the usual serving dtype
    local.enable_noise_floor("bfloat16")
    remote.enable_noise_floor("bfloat16")
    batch = items(tokenizer)
    here = local.score_sync(batch, top_m=5, noise_top_k=4)
    there = asyncio.run(remote.score(batch, top_m=5, noise_top_k=4))
    for item, a, b in zip(batch, here, there):
        assert len(a.reference) == len(b.reference) == len(a.noise) == len(b.noise) == len(item.output_ids)
        for ids, p, q, n, m in zip(item.candidate_ids, a.reference, b.reference, a.noise, b.noise):
            assert p.top_ids == q.top_ids
            assert set(p.logprobs) == set(q.logprobs) == set(ids) | set(n)  # the candidate's ids and the noise floor's
            assert [p.logprobs[t] for t in p.logprobs] == pytest.approx([q.logprobs[t] for t in p.logprobs], abs=1e-6)
            assert p.top_logprobs == pytest.approx(q.top_logprobs, abs=1e-6)
            assert list(n) == list(m) and list(n.values()) == pytest.approx(list(m.values()), abs=1e-6)


def test_reference_service_requires_its_token(reference_server):
    with pytest.raises(ShadowReferenceError, match="401"):
        RemoteScorer.connect(reference_server.url, "wrong", timeout=10)
    reply = httpx.post(f"{reference_server.url}/v1/shadow/score", json={"items": []}, headers=reference_server.headers)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "items"


def chat_and_wait(server, max_tokens: int) -> str:
    """One shadowed chat; returns /metrics once the reference has compared it."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": max_tokens,
            "temperature": 0}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).status_code == 200
    deadline = time.monotonic() + 60
    while _value(text := httpx.get(f"{server.url}/metrics").text, "shadow_samples_total", 'outcome="compared"') < 1:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    return text


def test_server_with_remote_reference_compares_traffic(reference_server, demo_model, tmp_path):
    server = start_server(
        ["--model", str(demo_model), "--engine", "transformers", "--dtype", "float32", "--shadow-rate", "1.0",
         "--shadow-noise-floor", "off",
         "--shadow-reference-url", reference_server.url, "--shadow-reference-token", REFERENCE_TOKEN],
        tmp_path / "server.log",
    )
    try:
        text = chat_and_wait(server, max_tokens=10)
        # Same weights, both fp32: every token agrees.
        assert _value(text, "shadow_sequences_total", 'result="identical"') == 1
        assert _value(text, "shadow_tokens_total", 'top1="different"') == 0
    finally:
        server.stop()


def test_the_remote_noise_floor_runs_in_the_serving_dtype(reference_server, demo_model, tmp_path):
    """A bf16 candidate gets its noise floor from the service, on the same positions; an
    engine calibration measured on the service's reference (matched by the reference's
    name, not the candidate's directory) scales it."""
    candidate = tmp_path / "converted"  # the candidate's directory is not named like the reference's
    shutil.copytree(demo_model, candidate, ignore=shutil.ignore_patterns("model.safetensors"))
    (candidate / "model.safetensors").symlink_to(demo_model / "model.safetensors")
    calibration = tmp_path / "calibration.json"
    facts = EngineFacts(engine="transformers", engine_version=version("transformers"), dtype="bfloat16",
                        compile_mode="eager", device="cpu", reference=demo_model.name)
    Calibration(facts=facts, kl_ratio=0.5, kl_ratio_low=0.4, kl_ratio_high=0.6, top1_ratio=1.0, sequences=32,
                tokens=2048, measured_at="2026-12-03T07:00:00+00:00").save(calibration)
    server = start_server(
        ["--model", str(candidate), "--served-model-name", MODEL_NAME, "--engine", "transformers", "--dtype", "bfloat16",
         "--shadow-rate", "1.0", "--shadow-reference-url", reference_server.url,
         "--shadow-reference-token", REFERENCE_TOKEN, "--verdict-calibration", str(calibration)],
        tmp_path / "server.log",
    )
    try:
        text = chat_and_wait(server, max_tokens=8)
        tokens = {c: _value(text, "shadow_token_kl_divergence_count", f'comparison="{c}"') for c in ("candidate", "noise_floor")}
        assert tokens["candidate"] == tokens["noise_floor"] > 0
        report = httpx.get(f"{server.url}/v1/shadow/verdict", timeout=30).json()
        assert report["noise_dtype"] == "bfloat16" and report["noise_floor"]["tokens"] == tokens["candidate"]
        floor = report["verdict"]["floor"]
        assert floor["kind"] == "calibrated" and floor["kl_scale"] == 0.5
        assert floor["calibration"]["facts"]["reference"] == report["reference"] == demo_model.name
    finally:
        server.stop()


def _value(text: str, name: str, selector: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{") and selector in line)
