"""server/openapi.py: the document says what the server really answers."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from server.openapi import install_openapi
from server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from server.serving.validation import RequestValidator

LIMITS = RequestValidator(max_n=4, max_logprobs=5, max_message_chars=300, max_prompts=3, max_stop_chars=7,
                          max_request_bytes=4096)


class Card(BaseModel):
    id: str


def make_app(auth: bool) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health(): ...

    @app.get("/metrics")
    async def metrics(): ...

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Card: ...

    @app.get("/v1/shadow/verdict")
    async def verdict(window: float | None = None) -> Card: ...

    @app.post("/v1/chat/completions")
    async def chat(request: ChatCompletionRequest): ...

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest): ...

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest): ...

    install_openapi(app, auth=auth, validator=LIMITS)
    return app


@pytest.mark.parametrize("auth", [False, True])
def test_statuses_schemas_and_media_types(auth):
    doc = make_app(auth).openapi()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert schemas["Error"]["required"] == ["message", "type", "param", "code"]
    codes = {(p, m): set(op["responses"]) for p, ops in paths.items() for m, op in ops.items()}
    assert all("422" not in c for c in codes.values())
    a = {"401"} if auth else set()
    assert codes["/health", "get"] == {"200", "503"}
    assert codes["/metrics", "get"] == {"200"}
    assert codes["/v1/models/{model}", "get"] == {"200", "404", "503"} | a
    assert codes["/v1/shadow/verdict", "get"] == {"200", "400", "404", "503"} | a
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert codes[path, "post"] == {"200", "400", "404", "413", "503"} | a
        assert set(paths[path]["post"]["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        assert ("security" in paths[path]["post"]) == auth
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [CONTENT_TYPE_LATEST]
    assert paths["/v1/models/{model}"]["get"]["responses"]["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"}
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 4
    assert {"type": "integer", "minimum": 0, "maximum": 5}.items() <= schemas["CompletionRequest"]["properties"][
        "logprobs"]["anyOf"][0].items()
    message = schemas["AssistantMessage"]
    assert "refusal" in message["properties"]


def test_the_validators_limits_are_the_request_schemas_bounds():
    """Each limit the schema can state exactly, from the validator: maxima, string lengths, batch sizes."""
    doc = make_app(auth=False).openapi()
    schemas = doc["components"]["schemas"]
    chat, completion = schemas["ChatCompletionRequest"]["properties"], schemas["CompletionRequest"]["properties"]
    assert completion["n"]["maximum"] == 4
    assert chat["top_logprobs"]["anyOf"][0]["maximum"] == completion["prompt_logprobs"]["anyOf"][0]["maximum"] == 5
    text, ids, texts, id_lists = completion["prompt"]["anyOf"]
    assert (text["maxLength"], texts["maxItems"], texts["items"]["maxLength"], id_lists["maxItems"]) == (300, 3, 300, 3)
    assert "maxItems" not in ids and "maxLength" not in ids["items"]  # one prompt's token ids: not a batch
    assert schemas["TokenizeRequest"]["properties"]["prompt"]["anyOf"][0]["maxLength"] == 300
    content = schemas["ChatMessage"]["properties"]["content"]["anyOf"]
    assert content[0] == {"type": "string", "maxLength": 300} and "maxLength" not in content[1]  # parts: joined
    for stop in (chat["stop"], completion["stop"]):
        one, many, _ = stop["anyOf"]
        assert (one["maxLength"], many["items"]["maxLength"], many["maxItems"]) == (7, 7, 16)
    too_large = doc["paths"]["/v1/completions"]["post"]["responses"]["413"]["description"]
    assert "4096 bytes" in too_large and "--max-request-bytes" in too_large


def test_the_bounds_are_the_documents_own():
    """Two apps with other limits: neither document's bounds leak into the other's (nor into the models')."""
    other = FastAPI()

    @other.post("/v1/completions")
    async def completions(request: CompletionRequest): ...

    install_openapi(other, validator=RequestValidator(max_stop_chars=99))
    assert other.openapi()["components"]["schemas"]["CompletionRequest"]["properties"]["stop"]["anyOf"][0][
        "maxLength"] == 99
    assert make_app(auth=False).openapi()["components"]["schemas"]["CompletionRequest"]["properties"]["stop"][
        "anyOf"][0]["maxLength"] == 7
    assert "maxLength" not in CompletionRequest.model_json_schema()["properties"]["stop"]["anyOf"][0]


PROBES = [None, False, True, 0, 1, 2, 2.5, "", "none", "x", [], [1], {}, {"type": "text"}, {"type": "json_object"}]


@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_refused_openai_fields_are_documented_as_what_passes(model):
    """Each of OpenAI's fields this server refuses (best_of, tools, ...) is in the schema
    as exactly what passes: a probe value the documented property admits is accepted, any
    other refused, naming the field (best_of: with `n` equal to it, what no schema says)."""
    from jsonschema import Draft202012Validator

    from server.protocol import _UNSUPPORTED

    schema = make_app(auth=False).openapi()["components"]["schemas"][model.__name__]
    assert all(f"`{name}`" in schema["description"] for name in _UNSUPPORTED)
    base = {"model": "m", **({"messages": [{"role": "user", "content": "hi"}]} if model is ChatCompletionRequest
                             else {"prompt": "hi"})}
    for name in _UNSUPPORTED:
        documented = schema["properties"][name]
        assert "not supported" in documented["description"]
        for value in PROBES:
            n = value if name == "best_of" and type(value) is int and value >= 1 else 1
            admitted = Draft202012Validator(documented).is_valid(value)
            try:
                model.model_validate({**base, "n": n, name: value})
                accepted = True
            except ValueError as refused:
                assert f"'{name}' is not supported" in str(refused)
                accepted = False
            assert admitted == accepted, (name, value)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_schema_valid_vllm_extensions_are_accepted(path):
    """What schemathesis generates as schema-valid for the unsupported vLLM extensions
    and OpenAI fields passes the request model (CI once drew `kv_transfer_params: 54826`
    from a `{"const": null}` the generator ignores); best_of with `n` equal to it."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    from server.protocol import _UNSUPPORTED, _VLLM_OFF

    model = ChatCompletionRequest if "chat" in path else CompletionRequest
    own = set(model.model_fields)
    operation = schemathesis.openapi.from_dict(make_app(auth=False).openapi())[path]["POST"]
    seen = set()

    @given(case=operation.as_strategy(GenerationMode.POSITIVE))
    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    def check(case):
        extensions = {k: v for k, v in case.body.items() if (k in _VLLM_OFF or k in _UNSUPPORTED) and k not in own}
        seen.update(extensions)
        body = {"model": "m", **({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}),
                **extensions, "n": extensions.get("best_of") or 1}
        model.model_validate(body)  # raises on a refused extension

    check()
    assert len(seen) >= 10 and seen & set(_UNSUPPORTED)  # the generator did reach the extension fields
