"""Limits, unencodable text, metric cardinality, API docs off by default, and streams
that start with the engine's first output (issue 10, items 2, 3, 4, 11).

A real `shadowserve serve` (transformers engine) with small limits, and for the stream
start an in-process app whose real engine is wrapped to be slow or to refuse."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from server.app import create_app
from server.assembly import assemble_serving
from server.engines import EngineInputError
from server.settings import ServeSettings
from tests.conftest import MODEL_NAME
from tests.servers import start_server

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MAX_BYTES = 8_000_000
MAX_CHARS = 6_000_000


@pytest.fixture(scope="module")
def server(demo_model, tmp_path_factory):
    server = start_server(
        ["--model", str(demo_model), "--engine", "transformers", "--dtype", "float32", "--max-model-len", "512",
         "--max-request-bytes", str(MAX_BYTES), "--max-message-chars", str(MAX_CHARS), "--max-prompts", "4",
         "--max-stop-chars", "8", "--max-request-tokens", "64"],
        tmp_path_factory.mktemp("hardening") / "server.log",
    )
    yield server
    server.stop()


def chat(content: str = "hi", **fields) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def error_of(reply: httpx.Response, status: int) -> dict:
    assert reply.status_code == status, reply.text[:300]
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(server):
    body = json.dumps(chat("x" * (MAX_BYTES + 10))).encode()
    error = error_of(httpx.post(server.url + CHAT, content=body, headers={"Content-Type": "application/json"}, timeout=60), 413)
    assert "--max-request-bytes" in error["message"] and str(MAX_BYTES) in error["message"]
    assert error["code"] == "payload_too_large"


def test_a_chunked_body_over_the_limit_is_refused(server):
    def pieces():
        yield b'{"model": "%s", "messages": [{"role": "user", "content": "' % MODEL_NAME.encode()
        for _ in range(9):
            yield b"y" * 1_000_000
        yield b'"}]}'

    error = error_of(httpx.post(server.url + CHAT, content=pieces(), headers={"Content-Type": "application/json"}, timeout=60), 413)
    assert "--max-request-bytes" in error["message"]


@pytest.mark.parametrize(("body", "path", "flag", "param"), [
    (chat("z" * (MAX_CHARS + 1)), CHAT, "--max-message-chars", "messages.0.content"),
    ({"model": MODEL_NAME, "prompt": ["a", "b", "c", "d", "e"], "max_tokens": 1}, COMPLETIONS, "--max-prompts", "prompt"),
    (chat(stop=["a-long-stop"]), CHAT, "--max-stop-chars", "stop"),
    (chat(n=4, max_tokens=20), CHAT, "--max-request-tokens", "max_tokens"),
    ({"model": MODEL_NAME, "prompt": ["a", "b"], "n": 2, "max_tokens": 20}, COMPLETIONS, "--max-request-tokens", "max_tokens"),
])
def test_each_limit_is_a_400_that_names_its_flag(server, body, path, flag, param):
    error = error_of(httpx.post(server.url + path, json=body, timeout=60), 400)
    assert flag in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_without_max_tokens_the_budget_is_shared_out_not_refused(server):
    """No max_tokens: the room left in the 512-token context (3 x ~480) is over the budget
    of 64, so each choice gets 64 // 3 tokens at most instead of a refusal."""
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me a long story."}], "n": 3}
    reply = httpx.post(server.url + CHAT, json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] <= 64
    assert any(c["finish_reason"] == "length" for c in reply.json()["choices"])


def test_ignore_eos_runs_to_max_tokens_on_the_transformers_engine(server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Say only the word yes."}],
            "max_tokens": 40, "temperature": 0}
    plain = httpx.post(server.url + CHAT, json=body, timeout=120).json()
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 40
    forced = httpx.post(server.url + CHAT, json={**body, "ignore_eos": True}, timeout=120).json()
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 40


def test_within_the_limits_a_request_is_served(server):
    reply = httpx.post(server.url + CHAT, json=chat(n=2, max_tokens=8, stop=["\n\n"]), timeout=60)
    assert reply.status_code == 200 and len(reply.json()["choices"]) == 2


@pytest.mark.parametrize(("raw", "param"), [
    ('{"model": "%s", "messages": [{"role": "user", "content": "ab\\ud800cd"}], "max_tokens": 2}', "messages.0.content"),
    ('{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}], "max_tokens": 2}',
     "messages.0.content.0.text"),
    ('{"model": "%s", "prompt": ["ok", "x\\udc00"], "max_tokens": 2}', "prompt.1"),
    ('{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"], "max_tokens": 2}', "stop.0"),
    ('{"model": "\\ud800%s", "messages": [{"role": "user", "content": "hi"}]}', "model"),
])
def test_lone_surrogates_are_a_400_a_person_understands(server, raw, param):
    path = COMPLETIONS if '"prompt"' in raw else CHAT
    reply = httpx.post(server.url + path, content=raw % MODEL_NAME, headers={"Content-Type": "application/json"}, timeout=30)
    error = error_of(reply, 400)
    assert "surrogate" in error["message"] and error["param"] == param
    assert "TextEncodeInput" not in error["message"]


def test_a_paired_surrogate_is_ordinary_text(server):
    raw = '{"model": "' + MODEL_NAME + '", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}'
    assert httpx.post(server.url + CHAT, content=raw, headers={"Content-Type": "application/json"}, timeout=60).status_code == 200


def test_health_stays_fast_while_a_5mb_prompt_is_tokenized(server):
    """The 5 MB message is within the limits here, so it is rendered and tokenized (then
    refused: it does not fit the context); /health must not wait for it."""
    latencies: list[float] = []
    done = threading.Event()
    outcome: dict = {}

    def big_request():
        started = time.perf_counter()
        outcome["reply"] = httpx.post(server.url + CHAT, json=chat("the quick brown fox. " * 250_000), timeout=120)
        outcome["seconds"] = time.perf_counter() - started
        done.set()

    worker = threading.Thread(target=big_request)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        worker.start()
        while not done.is_set():
            started = time.perf_counter()
            assert client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    worker.join()
    error = error_of(outcome["reply"], 400)
    assert error["code"] == "context_length_exceeded"  # it was tokenized, not refused by a limit
    assert outcome["seconds"] > 0.5 and len(latencies) >= 20
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    assert p99 < 0.1, f"/health p99 {p99 * 1000:.0f} ms over {len(latencies)} probes"


# Methods uvicorn's parser accepts (it refuses made-up ones before the app sees them).
ODD_METHODS = ("PROPFIND", "MKCOL", "LOCK", "UNLOCK", "COPY", "MOVE", "SEARCH", "PURGE", "REPORT", "TRACE")


def test_junk_methods_and_paths_cannot_mint_metric_series(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for n, method in enumerate(ODD_METHODS):
            client.request(method, f"/v1/random-{n}")
            client.request(method, CHAT)
            client.get(f"/nowhere/{n}")
        text = client.get("/metrics").text
    series = [line for line in text.splitlines() if line.startswith("shadowserve_http_requests_total{")]
    assert not any(m in line for m in ODD_METHODS for line in series)
    assert not any("random-" in line or "nowhere" in line for line in series)
    assert any('method="other"' in line and 'route="unmatched"' in line for line in series)
    methods = {line.split('method="')[1].split('"')[0] for line in series}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}


def test_api_docs_are_off_by_default(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path, timeout=10).status_code == 404


# --- streams start with the engine's first output (in-process, real engine wrapped) ---


class WrappedEngine:
    """The real transformers engine, made slow to start or refusing at start."""

    def __init__(self, engine, delay_s: float = 0.0, refuse: bool = False):
        self._engine, self._delay_s, self._refuse = engine, delay_s, refuse
        self.name, self.max_model_len, self.dtype = engine.name, engine.max_model_len, engine.dtype

    async def generate(self, prompt_ids, options, request_id, adapter=None):
        await asyncio.sleep(self._delay_s)
        if self._refuse:
            raise EngineInputError("the engine refuses this request")
        async for chunk in self._engine.generate(prompt_ids, options, request_id):
            yield chunk

    async def check_health(self):
        await self._engine.check_health()

    async def shutdown(self):
        await self._engine.shutdown()


@pytest.fixture(scope="module")
def wrapped(demo_model):
    settings = ServeSettings(model=demo_model, engine="transformers", dtype="float32", max_model_len=512)
    holder: dict = {}

    def load(settings, registry):
        ctx = assemble_serving(settings, registry)
        holder["engine"] = engine = WrappedEngine(ctx.engine)
        return dataclasses.replace(ctx, engine=engine)

    with TestClient(create_app(settings, load, CollectorRegistry())) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        yield client, holder["engine"]


def test_an_engine_refusal_before_the_first_output_is_an_http_error(wrapped):
    client, engine = wrapped
    engine._refuse = True
    try:
        reply = client.post(CHAT, json=chat(stream=True))
    finally:
        engine._refuse = False
    error = error_of(reply, 400)
    assert "refuses" in error["message"]


def test_the_stream_starts_with_the_engine(wrapped):
    """Headers and the role chunk wait for the engine's first output (a 1.5 s start here),
    so a client's time to first token is the engine's, not the server's."""
    client, engine = wrapped
    engine._delay_s = 1.5
    try:
        started = time.perf_counter()
        with client.stream("POST", CHAT, json=chat(stream=True)) as reply:
            headers_at = time.perf_counter() - started
            assert reply.status_code == 200
            events = [line for line in reply.iter_lines() if line.startswith("data: ")]
    finally:
        engine._delay_s = 0.0
    assert headers_at >= 1.4, f"headers after {headers_at:.2f}s, before the engine started"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "data: [DONE]"
