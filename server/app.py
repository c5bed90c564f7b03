"""The FastAPI app: a thin router over the handlers, plus readiness, auth and /metrics.

The engine loads in the background after the server starts listening, so /health can
answer 503 while weights load (Kubernetes readiness), then 200.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from server.auth import require_bearer
from server.body_limit import BodySizeLimit
from server.engines import Engine, EngineDeadError
from server.errors import (
    APIError,
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
from server.serving.context import ReferenceRefusedError, ServingContext
from server.serving.tokenize import TokenizeHandler
from server.settings import ServeSettings
from shadow.calibration import CalibrationError
from shadow.path import ShadowPath
from shadow.report import ShadowReport
from shadow.scoring import ReferenceLoadError

log = logging.getLogger(__name__)

# Routes behind --api-keys: the OpenAI API, and vLLM's tokenizer routes (they cost a
# tokenization). Probes (/health) and Prometheus (/metrics) stay open.
PROTECTED = ("/v1/", "/tokenize", "/detokenize")

# `X-Shadow: always|never`, honoured only when the operator allows it (shadow settings).
ShadowHeader = Annotated[str | None, Header(alias="X-Shadow")]

REFERENCE_EXIT = 2  # a reference that cannot be used is a configuration error (as verify's exit 2)
REFERENCE_CHECK_AT_START_S = 120.0  # one probe forward per side; a slower one goes on in the background
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


def in_daemon_thread(fn: Callable[[], object]) -> asyncio.Future:
    """`fn()` on a thread of its own, awaitable. Not the loop's default executor: a start
    that hangs inside the engine would hold asyncio.run's exit (it joins that executor),
    while a daemon thread is simply left behind."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        if not done.set_running_or_notify_cancel():  # given up on before it began
            return
        try:
            done.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 (a library's SystemExit too: handed to the awaiting task)
            done.set_exception(exc)

    threading.Thread(target=run, name="engine-load", daemon=True).start()
    return asyncio.wrap_future(done)


async def check_reference_first(shadow: ShadowPath) -> None:
    """The reference's self-check before the server reports ready, so its figures are in
    the start-up log and its probe is not mixed with client traffic. A check that cannot
    run yet (a remote reference not reachable, a failed call, too slow) is left to the
    shadow's worker, which retries it before scoring anything."""
    if not shadow.scorer.ready:
        return
    try:
        await asyncio.wait_for(shadow.run_reference_check(retry=False), REFERENCE_CHECK_AT_START_S)
    except Exception as exc:  # noqa: BLE001 (the worker retries; serving goes on)
        log.warning("shadow: the reference self-check did not finish at start (%s); retried in the background",
                    str(exc) or type(exc).__name__)


async def shut_down(ctx: ServingContext) -> None:
    """What a start that failed after the engine started leaves: the engine (its processes)
    and the shadow's reference client. Errors are logged: the refusal is what matters."""
    try:
        await ctx.engine.shutdown()
    except Exception:
        log.exception("the engine could not be shut down")
    if ctx.shadow is not None:
        try:
            await ctx.shadow.scorer.close()
        except Exception:
            log.exception("the reference client could not be closed")


def start_failure(exc: BaseException) -> tuple[str, int]:
    """What a failed start prints and exits with: the reference's side (exit 2, named as
    the reference's) or the engine's (exit 1). "engine failed to load" is only the engine's."""
    if isinstance(exc, CalibrationError):  # asked for, and not valid for this engine: never judge by a wrong floor
        log.error("%s", exc)
        return str(exc), REFERENCE_EXIT
    if isinstance(exc, ReferenceRefusedError):  # it loaded, but does not fit this server
        log.error("the reference was refused: %s", exc)
        return f"the reference was refused: {exc}", REFERENCE_EXIT
    if isinstance(exc, ReferenceLoadError):  # the engine was not even started: the reference is at fault
        log.error("the reference failed to load: %s", exc)
        return f"the reference failed to load: {exc}", REFERENCE_EXIT
    if isinstance(exc, APIError):  # a --lora-modules adapter the engine or the reference refused
        log.error("--lora-modules: %s", exc.message)
        return f"--lora-modules: {exc.message}", REFERENCE_EXIT
    log.exception("engine failed to load", exc_info=exc)
    return (f"engine failed to load: {exc!r}" if isinstance(exc, SystemExit) else f"engine failed to load: {exc}"), 1


class ServerState:
    """Readiness: `ctx` appears once the engine is up; `error` if loading failed or the
    engine died; `draining` from SIGTERM on. Only a ready, live, undrained server admits."""

    def __init__(self) -> None:
        self.ctx: ServingContext | None = None
        self.error: str | None = None
        self.exit_code = 1  # the process's status when `error` ends it
        self.loading = False  # the engine's load thread is running (it may hang inside the engine)
        self.draining = False
        self.in_flight = InFlight()
        self.chat: ChatHandler | None = None
        self.completion: CompletionHandler | None = None
        self.tokens: TokenizeHandler | None = None

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
        def load_in_thread() -> ServingContext:
            try:
                return load_context(settings, registry)
            finally:
                state.loading = False

        async def load() -> None:
            limit = settings.start_timeout_s or None
            ctx = None
            try:
                state.loading = True
                ctx = await asyncio.wait_for(in_daemon_thread(load_in_thread), limit)
                if ctx.adapters is not None:
                    await ctx.mount(settings.lora_mounts(), settings.reference_lora_paths())
                if ctx.shadow is not None:
                    await check_reference_first(ctx.shadow)
                    ctx.shadow.start()
                state.ready(ctx)
                log.info("model %s ready (%s engine)", settings.model_name, settings.engine)
            except TimeoutError:  # the thread is left behind; the caller ends the process
                state.error = f"engine did not start within {limit:.0f}s (--start-timeout-s)"
                log.error("%s", state.error)
            except (Exception, SystemExit) as exc:  # a library's SystemExit in the load thread too
                state.error, state.exit_code = start_failure(exc)
            except asyncio.CancelledError:  # SIGTERM while the adapters mounted: the engine runs already
                if ctx is not None and state.ctx is None:
                    await asyncio.shield(shut_down(ctx))
                raise
            if state.error:
                if ctx is not None:  # refused after the engine started (an adapter): nothing is left behind
                    await shut_down(ctx)
                if on_fatal:
                    on_fatal()
                return
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
    install_openapi(app, protected_prefix=PROTECTED, auth=bool(settings.api_keys), max_n=settings.max_n,
                    max_logprobs=settings.max_logprobs)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(InFlightMiddleware, in_flight=state.in_flight)
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(registry))

    require_bearer(app, settings.api_keys, PROTECTED)

    @app.get("/health")
    async def health() -> Response:
        status = state.status
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(exposition((registry, *extra_registries)), media_type=CONTENT_TYPE_LATEST)

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

    if settings.allow_runtime_lora_updating:
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

    return app
