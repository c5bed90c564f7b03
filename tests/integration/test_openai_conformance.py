"""Our responses, from real requests to real servers, validated against OpenAI's own
published schemas (tests/fixtures/openai_openapi_subset.json, cut from
github.com/openai/openai-openapi by tests/fixtures/extract_openai_schemas.py).

The spec is OpenAPI 3.1 (JSON Schema 2020-12) but still carries a few 3.0-style
`nullable: true` keywords; those are rewritten into `null` alternatives before use.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration

SPEC_PATH = Path(__file__).parents[1] / "fixtures" / "openai_openapi_subset.json"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
BASE = "urn:openai-openapi"


def _nullable(node):
    """OpenAPI 3.0 `nullable: true` -> JSON Schema: add null to the type (and to an enum),
    or wrap a `$ref` in `anyOf [ref, null]`."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        if "type" in node:
            types = node["type"] if isinstance(node["type"], list) else [node["type"]]
            node["type"] = [*types, "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            ref_or_rest = {k: node.pop(k) for k in list(node) if k not in ("description", "title")}
            node["anyOf"] = [ref_or_rest, {"type": "null"}]
    return node


def load_spec() -> dict:
    return _nullable(json.loads(SPEC_PATH.read_text()))


SPEC = load_spec()
REGISTRY = Registry().with_resource(BASE, Resource(SPEC, specification=DRAFT202012))


def validator(name: str, patch=None) -> Draft202012Validator:
    schema = {"$ref": f"{BASE}#/components/schemas/{name}"}
    if patch is not None:  # a local, documented relaxation: a patched copy of the root schema
        schema = patch(copy.deepcopy(SPEC["components"]["schemas"][name]))
        schema = {**schema, "$id": f"{BASE}/patched/{name}"}
    return Draft202012Validator(schema, registry=REGISTRY)


def check(name: str, body: dict, patch=None) -> None:
    errors = sorted(validator(name, patch).iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, f"{name}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors) + f"\n{body}"


def _stream_finish_reason_may_be_null(schema: dict) -> dict:
    """The spec says streamed completions share CreateCompletionResponse's shape, whose
    finish_reason is a non-null enum; OpenAI's own streams (and its Python client) send
    `finish_reason: null` on every chunk but the last. Only that is relaxed."""
    reason = schema["properties"]["choices"]["items"]["properties"]["finish_reason"]
    reason["type"], reason["enum"] = ["string", "null"], [*reason["enum"], None]
    return schema


def sse_events(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line.removeprefix("data:").strip() for line in response.text.splitlines() if line.startswith("data:")]
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=server.headers, timeout=120)


def chat_body(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, **fields}


# --- the rewriting itself (no server) ----------------------------------------------


def test_nullable_rewrite_and_refs_resolve():
    assert _nullable({"type": "string", "enum": ["a"], "nullable": True}) == {"type": ["string", "null"], "enum": ["a", None]}
    assert _nullable({"$ref": "#/x", "nullable": True}) == {"anyOf": [{"$ref": "#/x"}, {"type": "null"}]}
    assert "nullable" not in json.dumps(SPEC)
    assert SPEC["source"]["commit"] and len(SPEC["source"]["commit"]) == 40
    # Every $ref in the subset resolves (the extractor copied the whole closure).
    for name in SPEC["components"]["schemas"]:
        validator(name).is_valid({})


def test_the_schemas_bite():
    """A message without `refusal` (our old shape) must fail, or the tests below prove nothing."""
    old = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                        "message": {"role": "assistant", "content": "hi"}}]}
    assert not validator("CreateChatCompletionResponse").is_valid(old)
    old["choices"][0]["message"]["refusal"] = None
    assert validator("CreateChatCompletionResponse").is_valid(old)


# --- both engines: chat -------------------------------------------------------------


@pytest.fixture(scope="module", params=["hf_server", "vllm_server"])
def server(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("logprobs", [False, True], ids=["plain", "logprobs"])
def test_chat(server, logprobs):
    fields = {"logprobs": True, "top_logprobs": 2} if logprobs else {}
    response = post(server, "/v1/chat/completions", chat_body(**fields))
    assert response.status_code == 200, response.text
    body = response.json()
    check("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["message"]["refusal"] is None
    assert (choice["logprobs"] is not None) == logprobs
    if logprobs:
        assert choice["logprobs"]["refusal"] is None and choice["logprobs"]["content"]


def test_chat_stream_chunks(server):
    body = chat_body(stream=True, logprobs=True, top_logprobs=2, stream_options={"include_usage": True})
    chunks = sse_events(post(server, "/v1/chat/completions", body))
    for chunk in chunks:
        check("CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


# --- transformers engine: the rest --------------------------------------------------


@pytest.mark.parametrize("logprobs", [None, 2], ids=["plain", "logprobs"])
def test_completion(hf_server, logprobs):
    body = {"model": MODEL_NAME, "prompt": "The sky is", "max_tokens": 6, "temperature": 0, "logprobs": logprobs}
    response = post(hf_server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    check("CreateCompletionResponse", response.json())


def test_completion_stream_chunks(hf_server):
    body = {"model": MODEL_NAME, "prompt": "The sky is", "max_tokens": 6, "temperature": 0, "logprobs": 2,
            "stream": True, "stream_options": {"include_usage": True}}
    chunks = sse_events(post(hf_server, "/v1/completions", body))
    for chunk in chunks[:-1]:
        check("CreateCompletionResponse", chunk, patch=_stream_finish_reason_may_be_null)
    final = chunks[-1]
    check("CreateCompletionResponse", final)
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 6
    assert all("usage" not in c for c in chunks[:-1])


def test_models(hf_server):
    response = httpx.get(f"{hf_server.url}/v1/models", timeout=30)
    assert response.status_code == 200
    check("ListModelsResponse", response.json())
    one = httpx.get(f"{hf_server.url}/v1/models/{MODEL_NAME}", timeout=30)
    assert one.status_code == 200
    check("Model", one.json())


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/chat/completions", {"model": MODEL_NAME, "messages": []}, 400),
        ("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "temperature": "hot"}, 400),
        ("GET", "/v1/models/no-such-model", None, 404),
        ("POST", "/v1/chat/completions", chat_body(model="no-such-model"), 404),
        ("GET", "/v1/nothing-here", None, 404),
    ],
    ids=["chat-400", "completion-400", "model-404", "chat-model-404", "route-404"],
)
def test_error_bodies(hf_server, method, path, body, status):
    response = httpx.request(method, f"{hf_server.url}{path}", json=body, timeout=30)
    assert response.status_code == status, response.text
    check("ErrorResponse", response.json())


def test_error_body_401(vllm_server):
    response = httpx.get(f"{vllm_server.url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert response.status_code == 401
    check("ErrorResponse", response.json())
    missing = httpx.post(f"{vllm_server.url}/v1/chat/completions", json=chat_body(), timeout=30)
    assert missing.status_code == 401
    check("ErrorResponse", missing.json())
