"""server/openapi.py: the document says what the server really answers."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from server.openapi import install_openapi
from server.protocol import ChatCompletionRequest, CompletionRequest


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

    install_openapi(app, auth=auth, max_n=4, max_logprobs=5)
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


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_schema_valid_vllm_extensions_are_accepted(path):
    """What schemathesis generates as schema-valid for the unsupported vLLM extensions
    passes the request model (CI once drew `kv_transfer_params: 54826` from a
    `{"const": null}` the generator ignores)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    from server.protocol import _VLLM_OFF

    model = ChatCompletionRequest if "chat" in path else CompletionRequest
    own = set(model.model_fields)
    operation = schemathesis.openapi.from_dict(make_app(auth=False).openapi())[path]["POST"]
    seen = set()

    @given(case=operation.as_strategy(GenerationMode.POSITIVE))
    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    def check(case):
        extensions = {k: v for k, v in case.body.items() if k in _VLLM_OFF and k not in own}
        seen.update(extensions)
        body = {"model": "m", **({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}),
                **extensions}
        model.model_validate(body)  # raises on a refused extension

    check()
    assert len(seen) >= 10  # the generator did reach the extension fields
