"""Faults on the real vLLM engine (issue 10, items 1 and 10): its engine-core process
killed mid-stream, and SIGTERM mid-stream. Each test owns its server: both end it."""

from __future__ import annotations

import json
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import MODEL_NAME
from tests.servers import RunningServer, start_server

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
LONG = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Count from 1 to 200, one number per line."}],
        "max_tokens": 96, "temperature": 0, "stream": True}


def vllm_server(demo_model, tmp_path_factory, name: str) -> RunningServer:
    return start_server(
        ["--model", str(demo_model), "--engine", "vllm", "--dtype", "bfloat16", "--enforce-eager", "true",
         "--max-model-len", "512", "--kv-cache-gib", "1", "--shutdown-grace-s", "60"],
        tmp_path_factory.mktemp(name) / "server.log",
    )


def events(lines) -> list[dict | str]:
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def engine_core(server: RunningServer) -> psutil.Process:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no EngineCore process under the server")


def first_content(lines) -> None:
    for line in lines:
        if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
            return
    raise AssertionError("the stream ended before any content")


def assert_openai_error(body: dict, type_: str) -> None:
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["type"] == type_


def test_engine_core_killed_mid_stream(demo_model, tmp_path_factory):
    server = vllm_server(demo_model, tmp_path_factory, "engine-kill")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", CHAT, json=LONG) as reply:
                lines = reply.iter_lines()
                first_content(lines)
                engine_core(server).send_signal(signal.SIGKILL)
                killed = time.monotonic()
                rest = events(lines)
            # The stream in flight: an OpenAI-shaped error event, then [DONE].
            assert rest[-1] == "[DONE]"
            errors = [e for e in rest[:-1] if "error" in e]
            assert len(errors) == 1, rest[-3:]
            assert_openai_error(errors[0], "service_unavailable")
            # /health turns 503 within 2 s of the death, saying why.
            while (health := client.get("/health")).status_code == 200:
                assert time.monotonic() - killed < 2.0, "/health still 200 two seconds after the engine died"
                time.sleep(0.05)
            assert health.status_code == 503 and "engine dead" in health.json()["status"]
            assert time.monotonic() - killed < 2.0
            # New requests: 503 in OpenAI's shape (until the process goes).
            reply = client.post(CHAT, json={**LONG, "stream": False})
            assert reply.status_code == 503
            assert_openai_error(reply.json(), "service_unavailable")
        # ...and the process exits non-zero, so Kubernetes restarts it.
        assert server.process.wait(timeout=60) != 0
        assert "engine dead" in server.log_tail(80)
    finally:
        server.stop()


def test_sigterm_mid_stream_drains_and_exits_zero(demo_model, tmp_path_factory):
    server = vllm_server(demo_model, tmp_path_factory, "sigterm")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", CHAT, json=LONG) as reply:
                lines = reply.iter_lines()
                first_content(lines)
                server.process.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                # Draining: probes read 503, new requests are refused in OpenAI's shape...
                with httpx.Client(base_url=server.url, timeout=10) as other:
                    health = other.get("/health")
                    refused = other.post(CHAT, json={**LONG, "stream": False})
                # ...while the stream in flight completes normally.
                rest = events(lines)
            assert health.status_code == 503 and health.json()["status"] == "shutting down"
            assert refused.status_code == 503
            assert_openai_error(refused.json(), "service_unavailable")
            assert rest[-1] == "[DONE]" and not any("error" in e for e in rest[:-1])
            assert rest[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
