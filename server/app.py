"""The FastAPI app: a thin router over the handlers, plus readiness, auth and /metrics.

The engine loads in the background after the server starts listening, so /health can
answer 503 while weights load (Kubernetes readiness), then 200.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from server.auth import require_bearer
from server.errors import ModelNotFoundError, NotFoundError, ServiceUnavailableError, install_error_handlers
from server.metrics import HttpMetrics, HttpMetricsMiddleware, exposition
from server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.serving.chat import ChatHandler
from server.serving.completion import CompletionHandler
from server.serving.context import ServingContext
from server.settings import ServeSettings
from shadow.report import ShadowReport

log = logging.getLogger(__name__)

# `X-Shadow: always|never`, honoured only when the operator allows it (shadow settings).
ShadowHeader = Annotated[str | None, Header(alias="X-Shadow")]

ContextLoader = Callable[[ServeSettings, CollectorRegistry], ServingContext]


async def cancel_on_disconnect(request: Request, work: Awaitable):
    """Run a handler, cancelling it (and so its engine requests) if the client hangs up
    first, as vLLM's server does. Streams return at once; sse-starlette watches them."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        return Response(status_code=499)  # nginx's "client closed request"; seen only by /metrics
    finally:
        watcher.cancel()
        if not task.done():  # client gone, or this request itself cancelled (shutdown)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ServerState:
    """Readiness: `ctx` appears once the engine is up; `error` if loading failed."""

    def __init__(self) -> None:
        self.ctx: ServingContext | None = None
        self.error: str | None = None
        self.chat: ChatHandler | None = None
        self.completion: CompletionHandler | None = None

    def ready(self, ctx: ServingContext) -> None:
        self.ctx, self.chat, self.completion = ctx, ChatHandler(ctx), CompletionHandler(ctx)

    def require(self) -> ServingContext:
        if self.ctx is None:
            raise ServiceUnavailableError(self.error or "the model is still loading")
        return self.ctx


def create_app(
    settings: ServeSettings,
    load_context: ContextLoader,
    registry: CollectorRegistry,
    extra_registries: tuple[CollectorRegistry, ...] = (),
    on_load_failure: Callable[[], None] | None = None,
) -> FastAPI:
    state = ServerState()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        async def load() -> None:
            try:
                ctx = await asyncio.to_thread(load_context, settings, registry)
                if ctx.shadow is not None:
                    ctx.shadow.start()
                state.ready(ctx)
                log.info("model %s ready (%s engine)", settings.model_name, settings.engine)
            except Exception as exc:
                log.exception("engine failed to load")
                state.error = f"engine failed to load: {exc}"
                if on_load_failure:
                    on_load_failure()

        loader = asyncio.create_task(load())
        yield
        loader.cancel()
        if state.ctx is not None:
            if state.ctx.shadow is not None:
                await state.ctx.shadow.stop()
            await state.ctx.engine.shutdown()

    app = FastAPI(title="shadowserve", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(registry))

    require_bearer(app, settings.api_keys)

    @app.get("/health")
    async def health() -> Response:
        if state.ctx is None:
            message = state.error or "loading"
            return JSONResponse({"status": message}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(exposition((registry, *extra_registries)), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        ctx = state.require()
        return ModelList(data=[ModelCard(id=ctx.model_name, max_model_len=ctx.engine.max_model_len)])

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        ctx = state.require()
        if model != ctx.model_name:
            raise ModelNotFoundError(f"The model '{model}' does not exist", param="model")
        return ModelCard(id=ctx.model_name, max_model_len=ctx.engine.max_model_len)

    @app.get("/v1/shadow/verdict")
    async def shadow_verdict(
        window: Annotated[float | None, Query(gt=0, description="seconds; default: every sequence kept")] = None,
        trajectory: Annotated[bool, Query(description="also the verdict after each sequence, in arrival order")] = False,
    ) -> ShadowReport:
        """The candidate judged against the noise floor, with the statistics behind it."""
        ctx = state.require()
        if ctx.shadow is None:
            raise NotFoundError("the shadow path is off on this server (--shadow-rate 0): there is no verdict")
        return await asyncio.to_thread(ctx.shadow.report, window, trajectory)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request, x_shadow: ShadowHeader = None):
        state.require()
        return await cancel_on_disconnect(http, state.chat.create(request, x_shadow))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request, x_shadow: ShadowHeader = None):
        state.require()
        return await cancel_on_disconnect(http, state.completion.create(request, x_shadow))

    return app
