"""Table-driven bad requests against the live vLLM server: each gets its status and an
OpenAI-shaped error body, never a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import API_KEY, MODEL_NAME

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
OK_MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": MODEL_NAME, "messages": OK_MESSAGES, **fields}


def completion(**fields):
    return {"model": MODEL_NAME, "prompt": "hi", **fields}


# (id, method, path, body (dict, or raw str), headers, status, error type, param, code)
CASES = [
    ("malformed-json", "POST", CHAT, "{not json", None, 400, "invalid_request_error", None, None),
    ("body-is-a-list", "POST", CHAT, "[1, 2]", None, 400, "invalid_request_error", None, None),
    ("missing-messages", "POST", CHAT, {"model": MODEL_NAME}, None, 400, "invalid_request_error", "messages", None),
    ("empty-messages", "POST", CHAT, chat(messages=[]), None, 400, "invalid_request_error", "messages", None),
    ("messages-not-a-list", "POST", CHAT, chat(messages="hello"), None, 400, "invalid_request_error", "messages", None),
    ("unknown-role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), None, 400, "invalid_request_error", "messages.0.role", None),
    ("image-part", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), None, 400, "invalid_request_error", "messages.0.content.0", None),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), None, 400, "invalid_request_error", "temperature", None),
    ("temperature-too-high", "POST", CHAT, chat(temperature=3.5), None, 400, "invalid_request_error", "temperature", None),
    ("top-p-zero", "POST", CHAT, chat(top_p=0), None, 400, "invalid_request_error", "top_p", None),
    ("n-zero", "POST", CHAT, chat(n=0), None, 400, "invalid_request_error", "n", None),
    ("n-boolean", "POST", CHAT, chat(n=True), None, 400, "invalid_request_error", "n", None),
    ("n-too-large", "POST", CHAT, chat(n=1000), None, 400, "invalid_request_error", "n", None),
    ("max-tokens-negative", "POST", CHAT, chat(max_tokens=-5), None, 400, "invalid_request_error", "max_tokens", None),
    ("max-tokens-past-context", "POST", CHAT, chat(max_tokens=10_000), None, 400, "invalid_request_error", "max_tokens", "context_length_exceeded"),
    ("prompt-longer-than-context", "POST", COMPLETIONS, completion(prompt=[1] * 3000), None, 400, "invalid_request_error", "prompt", "context_length_exceeded"),
    ("presence-penalty-range", "POST", CHAT, chat(presence_penalty=5), None, 400, "invalid_request_error", "presence_penalty", None),
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=3), None, 400, "invalid_request_error", None, None),
    ("top-logprobs-too-many", "POST", CHAT, chat(logprobs=True, top_logprobs=50), None, 400, "invalid_request_error", "top_logprobs", None),
    ("completion-logprobs-too-many", "POST", COMPLETIONS, completion(logprobs=21), None, 400, "invalid_request_error", "logprobs", None),
    ("empty-stop-string", "POST", CHAT, chat(stop=[""]), None, 400, "invalid_request_error", "stop", None),
    ("stream-options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}), None, 400, "invalid_request_error", None, None),
    ("tools-unsupported", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), None, 400, "invalid_request_error", None, None),
    ("empty-prompt", "POST", COMPLETIONS, completion(prompt=""), None, 400, "invalid_request_error", "prompt", None),
    ("token-id-outside-vocab", "POST", COMPLETIONS, completion(prompt=[10**9]), None, 400, "invalid_request_error", "prompt", None),
    ("negative-seed", "POST", CHAT, chat(seed=-3), None, 400, "invalid_request_error", "seed", None),
    ("unknown-model", "POST", CHAT, chat(model="gpt-9"), None, 404, "invalid_request_error", "model", "model_not_found"),
    ("unknown-model-retrieve", "GET", "/v1/models/gpt-9", None, None, 404, "invalid_request_error", "model", "model_not_found"),
    ("unknown-route", "GET", "/v1/nothing-here", None, None, 404, "not_found_error", None, None),
    ("wrong-method", "GET", CHAT, None, None, 405, "invalid_request_error", None, None),
    ("missing-key", "POST", CHAT, chat(), {"Authorization": ""}, 401, "invalid_request_error", None, "invalid_api_key"),
    ("wrong-key", "POST", CHAT, chat(), {"Authorization": "Bearer nope"}, 401, "invalid_request_error", None, "invalid_api_key"),
    ("wrong-key-beats-bad-body", "POST", CHAT, "{not json", {"Authorization": "Bearer nope"}, 401, "invalid_request_error", None, "invalid_api_key"),
    # vLLM's extensions: honoured ones checked like OpenAI's fields, the others refused by name.
    ("min-tokens-past-max", "POST", CHAT, chat(max_tokens=4, min_tokens=9), None, 400, "invalid_request_error", None, None),
    ("top-k-below-minus-one", "POST", CHAT, chat(top_k=-2), None, 400, "invalid_request_error", "top_k", None),
    ("min-p-above-one", "POST", CHAT, chat(min_p=1.5), None, 400, "invalid_request_error", "min_p", None),
    ("repetition-penalty-zero", "POST", COMPLETIONS, completion(repetition_penalty=0), None, 400, "invalid_request_error", "repetition_penalty", None),
    ("beam-search-refused", "POST", CHAT, chat(use_beam_search=True), None, 400, "invalid_request_error", None, None),
    ("guided-json-refused", "POST", COMPLETIONS, completion(guided_json={"type": "object"}), None, 400, "invalid_request_error", None, None),
    # vLLM's tokenizer routes: same keys, shapes and checks.
    ("tokenize-neither", "POST", "/tokenize", {"model": MODEL_NAME}, None, 400, "invalid_request_error", None, None),
    ("tokenize-both", "POST", "/tokenize", {"prompt": "a", "messages": OK_MESSAGES}, None, 400, "invalid_request_error", None, None),
    ("tokenize-prompt-number", "POST", "/tokenize", {"prompt": 5}, None, 400, "invalid_request_error", "prompt", None),
    ("tokenize-unknown-model", "POST", "/tokenize", {"model": "gpt-9", "prompt": "a"}, None, 404, "invalid_request_error", "model", "model_not_found"),
    ("tokenize-missing-key", "POST", "/tokenize", {"prompt": "a"}, {"Authorization": ""}, 401, "invalid_request_error", None, "invalid_api_key"),
    ("detokenize-outside-vocab", "POST", "/detokenize", {"tokens": [10**9]}, None, 400, "invalid_request_error", "tokens", None),
    ("detokenize-strings", "POST", "/detokenize", {"tokens": ["a"]}, None, 400, "invalid_request_error", "tokens.0", None),
]


@pytest.mark.parametrize(
    "method, path, body, headers, status, type_, param, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request(vllm_server, method, path, body, headers, status, type_, param, code):
    sent_headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    kwargs = {"content": body} if isinstance(body, str) else {"json": body} if body is not None else {}
    response = httpx.request(method, vllm_server.url + path, headers=sent_headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert (error["type"], error["param"], error["code"]) == (type_, param, code), error


def test_probes_and_metrics_need_no_key(vllm_server):
    assert httpx.get(vllm_server.url + "/health").status_code == 200
    assert httpx.get(vllm_server.url + "/metrics").status_code == 200


def test_health_was_503_while_loading(vllm_server):
    assert vllm_server.health_seen[0] == 503 and vllm_server.health_seen[-1] == 200
