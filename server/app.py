"""The FastAPI app: a thin router over the handlers, plus readiness, auth and /metrics.

The engine loads in the background after the server starts listening, so /health can
answer 503 while weights load (Kubernetes readiness), then 200.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from server.assembly import ExitCode, StartFailed, bring_up
from server.auth import require_bearer
from server.body_limit import BodySizeLimit
from server.engines import Engine, EngineDeadError
from server.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
    install_error_handlers,
)
from server.lifecycle import InFlight, InFlightMiddleware
from server.metrics import HttpMetrics, HttpMetricsMiddleware, exposition
from server.openapi import install_openapi
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoraAdapterRequest,
)
from server.serving.chat import ChatHandler
from server.serving.completion import CompletionHandler
from server.serving.context import ServingContext
from server.serving.tokenize import TokenizeHandler
from server.serving.validation import RequestValidator
from server.settings import ServeSettings
from shadow.report import ShadowReport

log = logging.getLogger(__name__)

# Routes behind --api-keys: the OpenAI API, and vLLM's tokenizer routes (they cost a
# tokenization). Probes (/health) and Prometheus (/metrics) stay open.
PROTECTED = ("/v1/", "/tokenize", "/detokenize")

# `X-Shadow: always|never`, honoured only when the operator allows it (shadow settings).
ShadowHeader = Annotated[str | None, Header(alias="X-Shadow")]

HEALTH_INTERVAL_S = 0.5  # how often the engine's health is read (vLLM notices a dead core at once)
FATAL_LINGER_S = 2.0  # a dead engine's server answers 503 this long before it exits

ContextLoader = Callable[[ServeSettings, CollectorRegistry], ServingContext]


async def cancel_on_disconnect(request: Request, work: Awaitable):
    """Run a handler, cancelling it (and so its engine requests) if the client hangs up
    first, as vLLM's server does. Streams return at once; Starlette's
    StreamingResponse watches them (server/serving/sse.py)."""
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
    """Readiness: `ctx` appears once the engine is up; `error` if loading failed or the
    engine died; `draining` from SIGTERM on. Only a ready, live, undrained server admits."""

    def __init__(self) -> None:
        self.ctx: ServingContext | None = None
        self.error: str | None = None
        self.exit_code = ExitCode.FAILED  # the process's status when `error` ends it
        self.loading = False  # the engine's load thread is running (it may hang inside the engine)
        self.draining = False
        self.in_flight = InFlight()
        self.chat: ChatHandler | None = None
        self.completion: CompletionHandler | None = None
        self.tokens: TokenizeHandler | None = None

    def loaded(self) -> None:
        self.loading = False

    def ready(self, ctx: ServingContext) -> None:
        self.ctx, self.chat, self.completion = ctx, ChatHandler(ctx), CompletionHandler(ctx)
        self.tokens = TokenizeHandler(ctx)

    @property
    def status(self) -> str:
        if self.error:
            return self.error
        if self.draining:
            return "shutting down"
        return "loading" if self.ctx is None else "ok"

    def require(self) -> ServingContext:
        if self.status != "ok":
            raise ServiceUnavailableError(
                "the model is still loading" if self.status == "loading" else f"unavailable: {self.status}")
        return self.ctx

    async def drain(self, grace_s: float) -> None:
        """Stop admitting, then give in-flight requests `grace_s` to finish."""
        self.draining = True
        log.info("SIGTERM: draining %d in-flight requests (at most %.0fs)", self.in_flight.count, grace_s)
        if not await self.in_flight.wait_idle(grace_s):
            log.warning("shutdown grace over with %d requests still in flight", self.in_flight.count)

    async def watch(self, engine: Engine, on_fatal: Callable[[], None] | None) -> None:
        """The engine's own health, every HEALTH_INTERVAL_S: a dead engine fails /health
        and every request, and ends the process so Kubernetes restarts it."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await engine.check_health()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # EngineDeadError, or a check that itself broke: both fatal
                if not isinstance(exc, EngineDeadError):
                    log.exception("engine health check failed")
                log.error("engine dead: %s; exiting in %.0fs", exc, FATAL_LINGER_S)
                self.error = f"engine dead: {exc}"
                if on_fatal:
                    await asyncio.sleep(FATAL_LINGER_S)  # probes and clients first read a 503 saying why
                    on_fatal()
                return


def create_app(
    settings: ServeSettings,
    load_context: ContextLoader,
    registry: CollectorRegistry,
    extra_registries: tuple[CollectorRegistry, ...] = (),
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """`on_fatal` is called when the engine fails to load or dies: the caller ends the
    process (`state.error` says why)."""
    state = ServerState()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        async def load() -> None:
            state.loading = True
            try:
                ctx = await bring_up(settings, load_context, registry, loaded=state.loaded)
            except StartFailed as failed:
                state.error, state.exit_code = failed.message, failed.code
                if on_fatal:
                    on_fatal()
                return
            state.ready(ctx)
            log.info("model %s ready (%s engine)", settings.model_name, settings.engine)
            await state.watch(ctx.engine, on_fatal)

        loader = asyncio.create_task(load())
        yield
        loader.cancel()
        if state.ctx is not None:
            if state.ctx.shadow is not None:
                await state.ctx.shadow.stop()
            await state.ctx.engine.shutdown()

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="shadowserve", lifespan=lifespan, **docs)
    app.state.server = state
    app.state.drain = lambda: state.drain(settings.shutdown_grace_s)
    install_error_handlers(app)
    validator = RequestValidator.from_settings(settings)
    install_openapi(app, protected_prefix=PROTECTED, auth=bool(settings.api_keys), validator=validator)
    app.add_middleware(BodySizeLimit, max_bytes=validator.max_request_bytes)
    app.add_middleware(InFlightMiddleware, in_flight=state.in_flight)
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(registry))

    require_bearer(app, settings.api_keys, PROTECTED)

    _probe_routes(app, state, (registry, *extra_registries))
    _model_routes(app, state)
    if settings.allow_runtime_lora_updating:
        _lora_routes(app, state)
    _generation_routes(app, state)
    return app


def _probe_routes(app: FastAPI, state: ServerState, registries: tuple[CollectorRegistry, ...]) -> None:
    """Kubernetes' readiness probe and Prometheus' scrape: open, also behind --api-keys."""
    @app.get("/health")
    async def health() -> Response:
        status = state.status
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(exposition(registries), media_type=CONTENT_TYPE_LATEST)



def _model_routes(app: FastAPI, state: ServerState) -> None:
    """What is served: the models (the base and its mounted adapters) and their verdicts."""
    def model_cards(ctx: ServingContext) -> list[ModelCard]:
        """The base, then each mounted adapter with its directory and parent (vLLM's cards)."""
        cards = [ModelCard(id=ctx.model_name, max_model_len=ctx.engine.max_model_len)]
        for adapter in ctx.adapters.mounted if ctx.adapters else ():
            cards.append(ModelCard(id=adapter.name, max_model_len=ctx.engine.max_model_len, root=str(adapter.path),
                                   parent=ctx.model_name))
        return cards

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=model_cards(state.require()))

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        for card in model_cards(state.require()):
            if card.id == model:
                return card
        raise ModelNotFoundError(f"The model '{model}' does not exist", param="model")

    @app.get("/v1/shadow/verdict")
    async def shadow_verdict(
        window: Annotated[float | None, Query(gt=0, description="seconds; default: every sequence kept")] = None,
        trajectory: Annotated[bool, Query(description="also the verdict after each sequence, in arrival order")] = False,
        adapter: Annotated[str, Query(description="a mounted LoRA adapter's name (default: the base model)")] = "",
    ) -> ShadowReport:
        """The candidate (the base, or a mounted adapter) judged against the noise floor,
        with the statistics behind it."""
        ctx = state.require()
        if ctx.shadow is None:
            raise NotFoundError("the shadow path is off on this server (--shadow-rate 0): there is no verdict")
        try:
            return await asyncio.to_thread(ctx.shadow.report, window, trajectory, adapter)
        except KeyError:  # not mounted (or unloaded just now)
            raise NotFoundError(f"no mounted adapter '{adapter}' is shadowed here; mounted: "
                                f"{', '.join(ctx.shadow.adapters) or 'none'}", param="adapter") from None


def _lora_routes(app: FastAPI, state: ServerState) -> None:
    """--allow-runtime-lora-updating: vLLM's routes to mount and unmount adapters."""
    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: LoadLoraAdapterRequest) -> str:
        """vLLM's: mount a LoRA adapter at run time; it is shadowed from its first request."""
        ctx = state.require()
        if request.load_inplace:
            raise InvalidRequestError("load_inplace is not supported: unload the adapter, then load it again "
                                      "(its verdict starts over)", param="load_inplace")
        reference = Path(request.reference_path) if request.reference_path else None
        await ctx.adapters.load(request.lora_name, Path(request.lora_path), reference)
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: UnloadLoraAdapterRequest) -> str:
        """vLLM's: unmount an adapter; its queued shadow samples count as skipped."""
        ctx = state.require()
        await ctx.adapters.unload(request.lora_name)
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."


def _generation_routes(app: FastAPI, state: ServerState) -> None:
    """The OpenAI API's generation routes, and vLLM's tokenizer routes."""
    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http: Request, x_shadow: ShadowHeader = None):
        state.require()
        return await cancel_on_disconnect(http, state.chat.create(request, x_shadow))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request, x_shadow: ShadowHeader = None):
        state.require()
        return await cancel_on_disconnect(http, state.completion.create(request, x_shadow))

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        """vLLM's: the served tokenizer (and chat template) on a prompt or messages."""
        state.require()
        return await state.tokens.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's: token ids back to text."""
        state.require()
        return await state.tokens.detokenize(request)

