"""`shadowserve reference` hardening: no open service off loopback, 413 caps on tokens and
body size, constant-time bearer check over every key, API docs off by default."""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

import server.auth as auth
from server.reference_app import ReferenceSettings, create_reference_app
from server.serving.validation import ScoringValidator
from tests.scorers import EchoScorer

TOKEN = "s3cret-token"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("HOST", "TOKENS", "DOCS", "MAX_ITEM_TOKENS", "MAX_REQUEST_TOKENS", "MAX_BODY_BYTES"):
        monkeypatch.delenv(f"SHADOWSERVE_REFERENCE_{name}", raising=False)


def item(prompt: int, output: int) -> dict:
    return {"prompt_ids": [1] * prompt, "output_ids": [2] * output, "candidate_ids": [[1, 2]] * output}


def client(tokens: list[str] | None = None, docs: bool = False, **limits: int) -> TestClient:
    return TestClient(create_reference_app(EchoScorer(), tokens or [], CollectorRegistry(), docs=docs,
                                           validator=ScoringValidator(**limits)))


def assert_openai_error(reply: httpx.Response, status: int, code: str | None) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == code
    return error


# --- 1. no open service off loopback -----------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "reference.example"])
def test_a_non_loopback_host_needs_tokens(host):
    with pytest.raises(ValidationError, match="--tokens"):
        ReferenceSettings(model="/m", host=host)
    assert ReferenceSettings(model="/m", host=host, tokens="a,b").tokens == ["a", "b"]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_may_stay_open(host):
    assert ReferenceSettings(model="/m", host=host).tokens == []


def test_the_cli_refuses_with_exit_code_2_naming_the_flag(capsys, monkeypatch):
    from server import cli

    ran = []
    monkeypatch.setattr(cli, "run_reference", ran.append)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["reference", "--model", "/m", "--host", "0.0.0.0"])
    assert exit_.value.code == 2 and ran == []
    err = capsys.readouterr().err
    assert "invalid settings" in err and "--tokens" in err and "0.0.0.0" in err
    monkeypatch.setenv("SHADOWSERVE_REFERENCE_TOKENS", TOKEN)
    cli.main(["reference", "--model", "/m", "--host", "0.0.0.0"])
    assert ran[0].tokens == [TOKEN]


def test_the_cli_flags(monkeypatch):
    from server import cli

    ran = []
    monkeypatch.setattr(cli, "run_reference", ran.append)
    cli.main(["reference", "--model", "/m"])
    assert (ran[0].docs, ran[0].max_item_tokens, ran[0].max_request_tokens, ran[0].max_body_bytes) == (
        False, 8192, 32768, 16 * 1024 * 1024)
    cli.main(["reference", "--model", "/m", "--docs", "--max-item-tokens", "10", "--max-request-tokens", "20",
              "--max-body-bytes", "3000"])
    assert (ran[1].docs, ran[1].max_item_tokens, ran[1].max_request_tokens, ran[1].max_body_bytes) == (
        True, 10, 20, 3000)


# --- 2. caps: tokens per item and per request, body bytes ----------------------------------


def test_within_the_caps_scores():
    reply = client(max_item_tokens=8, max_request_tokens=16).post(
        "/v1/shadow/score", json={"items": [item(4, 4), item(4, 4)]})
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["items"]) == 2


def test_an_item_over_the_item_cap_is_413():
    reply = client(max_item_tokens=8).post("/v1/shadow/score", json={"items": [item(2, 2), item(5, 4)]})
    error = assert_openai_error(reply, 413, "payload_too_large")
    assert "--max-item-tokens" in error["message"] and "9" in error["message"] and "8" in error["message"]
    assert error["param"] == "items.1"


def test_a_request_over_the_request_cap_is_413():
    reply = client(max_item_tokens=8, max_request_tokens=20).post(
        "/v1/shadow/score", json={"items": [item(4, 4)] * 3})
    error = assert_openai_error(reply, 413, "payload_too_large")
    assert "--max-request-tokens" in error["message"] and "24" in error["message"] and "20" in error["message"]


def test_the_request_cap_counts_the_padded_batch_not_the_sum():
    """14 tokens in all, but padded to the longest item (8) the forward holds 4 x 8 = 32."""
    reply = client(max_item_tokens=8, max_request_tokens=20).post(
        "/v1/shadow/score", json={"items": [item(1, 7), item(1, 1), item(1, 1), item(1, 1)]})
    error = assert_openai_error(reply, 413, "payload_too_large")
    assert "padded" in error["message"] and "32" in error["message"]


def test_a_body_over_the_byte_cap_is_413_by_content_length():
    body = json.dumps({"items": [item(50, 50)]}).encode()
    reply = client(max_body_bytes=len(body) - 1).post(
        "/v1/shadow/score", content=body, headers={"Content-Type": "application/json"})
    error = assert_openai_error(reply, 413, "payload_too_large")
    assert "--max-body-bytes" in error["message"] and str(len(body)) in error["message"]
    ok = client(max_body_bytes=len(body)).post(
        "/v1/shadow/score", content=body, headers={"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text


def _post_streamed(app: FastAPI, body: bytes, headers: dict | None = None) -> httpx.Response:
    """No Content-Length: the body arrives in chunks (Transfer-Encoding: chunked)."""

    async def chunks():
        for start in range(0, len(body), 100):
            yield body[start:start + 100]

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://reference") as http:
            return await http.post("/v1/shadow/score", content=chunks(),
                                   headers={"Content-Type": "application/json", **(headers or {})})

    return asyncio.run(go())


def test_a_streamed_body_over_the_byte_cap_is_413():
    body = json.dumps({"items": [item(50, 50)]}).encode()
    app = create_reference_app(EchoScorer(), [], CollectorRegistry(), validator=ScoringValidator(max_body_bytes=len(body) - 1))
    error = assert_openai_error(_post_streamed(app, body), 413, "payload_too_large")
    assert "--max-body-bytes" in error["message"]
    app = create_reference_app(EchoScorer(), [], CollectorRegistry(), validator=ScoringValidator(max_body_bytes=len(body)))
    reply = _post_streamed(app, body)
    assert reply.status_code == 200 and len(reply.json()["items"][0]) == 50


def test_the_bearer_check_comes_before_the_body_cap():
    body = json.dumps({"items": [item(50, 50)]}).encode()
    http = client([TOKEN], max_body_bytes=10)
    reply = http.post("/v1/shadow/score", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(reply, 401, "invalid_api_key")
    reply = http.post("/v1/shadow/score", content=body,
                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert_openai_error(reply, 413, "payload_too_large")


@pytest.mark.parametrize("body, where", [
    ({"items": []}, "items"),
    ({"items": [{"prompt_ids": [1], "output_ids": [2, 2], "candidate_ids": [[1]]}]}, "items.0"),
])
def test_empty_items_and_misaligned_candidate_ids_are_400(body, where):
    error = assert_openai_error(client().post("/v1/shadow/score", json=body), 400, None)
    assert error["param"] == where


# --- 3. bearer keys: constant time over every key -------------------------------------------


def test_every_key_is_compared_as_a_sha256_digest(monkeypatch):
    compared = []

    def spy(a, b):
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ["first", "second-key", "third"]
    app = FastAPI()
    auth.require_bearer(app, keys)

    @app.get("/v1/ping")
    async def ping() -> dict:
        return {"ok": True}

    http = TestClient(app)
    for presented, status in [("first", 200), ("third", 200), ("nope", 401), ("", 401)]:
        compared.clear()
        reply = http.get("/v1/ping", headers={"Authorization": f"Bearer {presented}"})
        assert reply.status_code == status, presented
        # no early exit on a match, and nothing but fixed-length digests is compared
        assert len(compared) == len(keys), presented
        assert all(len(a) == len(b) == 32 for a, b in compared)
        assert {b for _, b in compared} == {hashlib.sha256(k.encode()).digest() for k in keys}
        assert {a for a, _ in compared} == {hashlib.sha256(presented.encode()).digest()}
    assert http.get("/v1/ping", headers={"Authorization": "Basic first"}).status_code == 401
    assert http.get("/v1/ping").status_code == 401


def test_key_matches():
    digests = [hashlib.sha256(k.encode()).digest() for k in ("a", "bb")]
    assert auth.key_matches("bb", digests) and auth.key_matches("a", digests)
    assert not auth.key_matches("b", digests) and not auth.key_matches("abb", digests)


# --- 4. API docs off unless --docs ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_are_off_by_default_and_on_with_the_flag(path):
    assert client().get(path).status_code == 404
    assert client(docs=True).get(path).status_code == 200
