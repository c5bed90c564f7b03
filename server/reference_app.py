"""`shadowserve reference`: the reference model as its own service, so it can run on its
own GPUs and scale on its own. The scorer is loaded before the app is built: the
service listens only once it can answer."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, CliImplicitFlag, NoDecode, SettingsConfigDict
from starlette.responses import Response

from server.auth import require_bearer
from server.body_limit import BodySizeLimit
from server.errors import (
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    install_error_handlers,
)
from server.metrics import HttpMetrics, HttpMetricsMiddleware, exposition
from server.serving.validation import MAX_BODY_BYTES, MAX_ITEM_TOKENS, MAX_SCORE_TOKENS, ScoringValidator
from shadow.placement import MaxMemory
from shadow.scoring import (
    ADAPTER_NOT_LOADED,
    LOAD_ADAPTER_PATH,
    SCORE_PATH,
    UNLOAD_ADAPTER_PATH,
    AdapterInfo,
    LoadAdapterBody,
    ReferenceBusyError,
    ReferenceInfo,
    ScoreItem,
    ScoreRequestBody,
    ScoreResponseBody,
    UnloadAdapterBody,
    to_body,
)

if TYPE_CHECKING:  # torch stays out of the CLI's import path
    from server.reference_adapters import ReferenceAdapters
    from shadow.local_scorer import LocalScorer


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "[::1]", "localhost"})
DEFAULT_LIMITS = ScoringValidator()  # the flags' defaults


class ReferenceSettings(BaseSettings):
    """Serve the fp32 reference for remote teacher-forced scoring (POST /v1/shadow/score)."""

    model_config = SettingsConfigDict(env_prefix="SHADOWSERVE_REFERENCE_", cli_kebab_case=True, extra="ignore", frozen=True)

    model: Path = Field(description="local Hugging Face directory of the reference (loaded in fp32)")
    adapter: Path | None = Field(default=None, description="unmerged PEFT adapter on top of the reference (the "
                                 "reference of a merged-LoRA candidate)")
    lora_modules: list[str] = Field(
        default_factory=list, description="LoRA adapters the candidates mount, NAME=DIR or JSON (vLLM's syntax; repeat "
        "the flag): one fp32 base shared by all, each applied unmerged to the score requests that name it")
    allow_runtime_lora_updating: bool = Field(
        default=False, description="POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind --tokens), and "
        "loads of an adapter a score request names with its path: what a candidate loads at run time")
    max_adapters: int = Field(default=16, ge=1, description="most LoRA adapters held at once; a load past it is refused")
    name: str | None = Field(default=None, description="reference name reported to servers (default: directory[+adapter])")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N (tensor parallel: cuda means each "
                        "rank's own GPU, cpu runs the ranks over gloo)")
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="ranks the fp32 reference (and its noise copy) is split over (PyTorch distributed): "
        "on one node it launches them itself (torchrun); across nodes run it under torchrun on each node")
    collective_timeout_s: float = Field(
        default=30.0, gt=0, description="tensor parallel, once loaded: a rank that does not answer a collective within "
        "this ends the service (CPU/gloo: 503, exit 1; GPU/NCCL: its watchdog aborts it); keep it below the "
        "candidates' --shadow-timeout-s")
    max_memory: MaxMemory = Field(
        default=None, description="spread the reference across devices with accelerate's device map, within this "
        "memory per device: '0=70GiB,1=70GiB' (GPU indices), cpu=SIZE, disk=SIZE (offload, slow)")
    trust_remote_code: bool = Field(default=False, description="run the Python code in the model's directory (auto_map)")
    noise_dtype: Literal["bfloat16", "float16", "float32", "none"] = Field(
        default="bfloat16",
        description="the candidates' serving dtype: the reference also runs in it for the noise floor (none = off)",
    )
    host: str = Field(default="127.0.0.1")
    port: int = Field(default=8001, ge=0, le=65535)
    tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer tokens (env: comma-separated); none = open"
    )
    max_item_tokens: int = Field(
        default=MAX_ITEM_TOKENS, ge=1, description="most prompt + output ids in one item of a score request (else 413)"
    )
    max_request_tokens: int = Field(
        default=MAX_SCORE_TOKENS, ge=1,
        description="most tokens in a score request, its items padded to the longest (what a forward costs; else 413)"
    )
    max_body_bytes: int = Field(default=MAX_BODY_BYTES, ge=1, description="largest score request body, in bytes (else 413)")
    docs: CliImplicitFlag[bool] = Field(default=False, description="serve /docs, /redoc and /openapi.json")
    log_level: str = Field(default="info")

    @field_validator("tokens", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _adapters_fit(self) -> ReferenceSettings:
        """Every --lora-modules adapter parsed, named once and fitting the base, before any weight loads."""
        from adapters.lora_adapter import check_lora_adapter

        mounts = self.lora_mounts()
        if mounts and self.adapter is not None:
            raise ValueError("--adapter makes the reference base + one adapter (a merged-LoRA candidate's reference); "
                             "--lora-modules mounts adapters on the bare base: give one or the other")
        names = [name for name, _ in mounts]
        if len(set(names)) != len(names):
            raise ValueError(f"--lora-modules: the name {next(n for n in names if names.count(n) > 1)!r} is given twice")
        if len(mounts) > self.max_adapters:
            raise ValueError(f"--lora-modules: {len(mounts)} adapters, but --max-adapters is {self.max_adapters}")
        for _, path in mounts:
            check_lora_adapter(path, self.model)  # LoraAdapterError is a ValueError: an invalid setting
        return self

    @model_validator(mode="after")
    def _splits(self) -> ReferenceSettings:
        """A tensor-parallel reference: the model divides by the size, and nothing that
        cannot be sharded is asked for, each refused naming why (before anything loads)."""
        if self.tensor_parallel_size == 1:
            return self
        from adapters import tensor_parallel
        from adapters.model_dir import is_model_dir, read_config

        size = self.tensor_parallel_size
        unsharded = {"--adapter": self.adapter, "--lora-modules": self.lora_modules,
                     "--allow-runtime-lora-updating": self.allow_runtime_lora_updating, "--max-memory": self.max_memory}
        given = [flag for flag, value in unsharded.items() if value]
        if given:
            raise ValueError(f"--tensor-parallel-size {size} with {', '.join(given)}: peft's LoRA layers are not "
                             "sharded by the tensor-parallel plan, and a device map places whole layers; serve "
                             "adapters on a reference of one rank")
        if not is_model_dir(self.model):
            return self
        try:
            problems = tensor_parallel.problems(read_config(self.model), size)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{self.model}: its config does not give the dimensions tensor parallelism cuts (heads, KV "
                             f"heads, intermediate size, vocabulary as integers): {exc!r}") from exc
        if problems:
            raise ValueError(f"{self.model} does not split over {size} ranks: " + "; ".join(problems))
        return self

    def lora_mounts(self) -> list[tuple[str, Path]]:
        from server.settings import parse_lora_module

        return [parse_lora_module(item) for item in self.lora_modules]

    @model_validator(mode="after")
    def _no_open_service_off_loopback(self) -> ReferenceSettings:
        if self.host not in LOOPBACK_HOSTS and not self.tokens:
            raise ValueError(
                f"--host {self.host} is reachable from other machines: set --tokens (env SHADOWSERVE_REFERENCE_TOKENS) "
                "so only servers holding a token can score on this reference (or bind 127.0.0.1)"
            )
        return self


def create_reference_app(
    scorer: LocalScorer,
    tokens: list[str],
    registry: CollectorRegistry,
    *,
    adapters: ReferenceAdapters | None = None,
    docs: bool = False,
    validator: ScoringValidator = DEFAULT_LIMITS,
) -> FastAPI:
    """`adapters`: the LoRA adapters it holds (server/reference_adapters.py; None: none,
    and none can be loaded). `docs`: serve /docs, /redoc and /openapi.json (off: the
    service describes itself to nobody). `validator`: the score requests' limits."""
    app = FastAPI(title="shadowserve reference", docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    install_error_handlers(app)
    # Innermost: after the bearer check.
    app.add_middleware(BodySizeLimit, max_bytes=validator.max_body_bytes, setting="--max-body-bytes")
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(registry))
    require_bearer(app, tokens)
    vocab_size = scorer.vocab.size

    def info() -> ReferenceInfo:
        return ReferenceInfo(
            name=scorer.name, vocab_size=vocab_size, vocab_sha256=scorer.vocab.sha256, dtype="float32",
            noise_dtype=scorer.noise_dtype, max_item_tokens=validator.max_item_tokens,
            max_request_tokens=validator.max_request_tokens,
            loaded_as=scorer.loaded_as, integrity_problems=scorer.integrity_problems,
            adapters=adapters.infos() if adapters else [], max_adapters=adapters.capacity if adapters else 0,
            runtime_lora_updating=bool(adapters and adapters.runtime_updating),
        )

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(exposition([registry]), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/shadow/info")
    async def shadow_info() -> ReferenceInfo:
        return info()

    @app.post(SCORE_PATH)
    async def score(body: ScoreRequestBody) -> Response:
        items = [ScoreItem(i.prompt_ids, i.output_ids, i.candidate_ids) for i in body.items]
        validator.check_items(items, vocab_size)
        if body.noise_top_k is not None and scorer.noise_dtype is None:
            raise InvalidRequestError("this reference computes no noise floor (started with --noise-dtype none)",
                                      param="noise_top_k")
        noise_top_k = None if body.noise_top_k is None else min(body.noise_top_k, vocab_size)
        top_m = min(body.top_m, vocab_size)
        try:
            if body.adapter is None:
                scored = await scorer.score(items, top_m, noise_top_k)
            elif adapters is None:
                raise NotFoundError(f"the adapter {body.adapter.name} is not on this reference: it mounts none",
                                    param="adapter.name", code=ADAPTER_NOT_LOADED)
            else:
                async with adapters.applied(body.adapter):
                    scored = await scorer.score(items, top_m, noise_top_k, body.adapter.name)
        except ReferenceBusyError as exc:
            raise ServiceUnavailableError(str(exc)) from exc
        reply = ScoreResponseBody(reference=scorer.name, items=[to_body(i, s) for i, s in zip(items, scored)])
        return Response(reply.model_dump_json(), media_type="application/json")

    if adapters is not None and adapters.runtime_updating:
        @app.post(LOAD_ADAPTER_PATH)
        async def load_lora_adapter(body: LoadAdapterBody) -> AdapterInfo:
            """Mount a LoRA adapter (a no-op when this content is held under this name already)."""
            return await adapters.load(body.lora_name, Path(body.lora_path))

        @app.post(UNLOAD_ADAPTER_PATH)
        async def unload_lora_adapter(body: UnloadAdapterBody) -> dict:
            """Unmount an adapter loaded at run time."""
            await adapters.unload(body.lora_name)
            return {"unloaded": body.lora_name}

    return app
