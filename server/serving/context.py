"""What every handler needs: the engine, the tokenizer, the served name and limits."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from server.engines import Engine, LoraAdapter, load_engine
from server.engines.facts import engine_facts
from server.errors import ModelNotFoundError
from server.serving.adapters import AdapterRegistry
from server.serving.limits import RequestLimits
from server.serving.prompts import PromptRenderer
from server.serving.reference_probe import reference_self_check
from server.settings import ServeSettings
from shadow.calibration import load_calibration
from shadow.factory import build_shadow_path, load_reference
from shadow.path import ShadowPath
from shadow.remote_code import RemoteCodeError
from shadow.scoring import AdapterUnavailableError, ReferenceLoadError, ShadowReferenceError, VocabularyMismatchError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingContext:
    engine: Engine
    renderer: PromptRenderer
    model_name: str
    max_n: int
    max_logprobs: int
    shadow: ShadowPath | None = None
    limits: RequestLimits = RequestLimits()
    adapters: AdapterRegistry | None = None  # mounted LoRA adapters (None: the base only)

    @classmethod
    def load(cls, settings: ServeSettings, registry: CollectorRegistry) -> ServingContext:
        """Blocking: tokenizer, the shadow's reference (checked first: a vocabulary
        mismatch fails fast), the engine (weights, and vLLM's engine-core process), then
        the noise floor in the dtype the engine really serves in. A refusal once the
        engine runs shuts the engine down before it is raised: nothing is left behind."""
        renderer = PromptRenderer.load(settings.model, settings.trust_remote_code)
        scorer = load_checked_reference(settings, renderer) if settings.shadow_enabled else None
        engine = load_engine(settings)
        try:
            return cls._assemble(settings, registry, renderer, engine, scorer)
        except BaseException:
            _shut_down(engine)
            raise

    @classmethod
    def _assemble(cls, settings: ServeSettings, registry: CollectorRegistry, renderer: PromptRenderer, engine: Engine,
                  scorer) -> ServingContext:
        shadow = None
        calibration = None
        if scorer is not None and settings.verdict_calibration is not None:
            calibration = load_calibration(settings.verdict_calibration, engine_facts(settings, engine, scorer.name))
            log.info("shadow: noise floor %s", calibration.describe())
        if scorer is not None:
            check = (reference_self_check(engine, renderer, scorer, settings.verdict_reference_max_excess_nats)
                     if settings.verdict_reference_check else None)
            try:
                shadow = build_shadow_path(
                    settings, scorer, model_name=settings.model_name, serving_dtype=engine.dtype,
                    candidate_tokenizer=renderer.tokenizer, registry=registry, self_check=check,
                    calibration=calibration, engine_load=engine.pending,
                )
            except ShadowReferenceError as exc:  # the reference's noise floor is not the engine's dtype
                raise ReferenceRefusedError(str(exc)) from exc
        adapters = None
        if settings.lora_enabled:
            adapters = AdapterRegistry(engine, settings.model_name, settings.model, rank_limit=settings.lora_rank_cap(),
                                       capacity=settings.lora_capacity, shadow=shadow,
                                       reference_dir=settings.shadow_reference_model)
        return cls(
            engine=engine,
            renderer=renderer,
            model_name=settings.model_name,
            max_n=settings.max_n,
            max_logprobs=settings.max_logprobs,
            limits=RequestLimits.from_settings(settings),
            shadow=shadow,
            adapters=adapters,
        )

    async def mount(self, mounts: list[tuple[str, Path]], reference_paths: dict[str, Path] | None = None) -> None:
        """The --lora-modules adapters, on the engine and the reference (its own copy where
        given), before serving: an APIError here stops the start, with its message, and
        one the reference cannot take (not held, other weights) is a ReferenceRefusedError."""
        for name, path in mounts:
            try:
                await self.adapters.load(name, path, (reference_paths or {}).get(name), at_start=True)
            except AdapterUnavailableError as exc:
                raise ReferenceRefusedError(str(exc)) from exc

    def resolve(self, requested: str) -> LoraAdapter | None:
        """The mounted adapter a request's `model` names, None for the base; 404 for any other name."""
        if self.adapters is not None:
            return self.adapters.resolve(requested)
        if requested != self.model_name:
            raise ModelNotFoundError(
                f"The model '{requested}' does not exist; this server serves '{self.model_name}'",
                param="model",
            )
        return None



class ReferenceRefusedError(ReferenceLoadError):
    """The reference does not fit this server (its noise floor's dtype, a mounted adapter
    it does not hold or holds other weights of): a refusal at start, exit 2."""


def load_checked_reference(settings: ServeSettings, renderer: PromptRenderer):
    """Blocking: the shadow's reference, loaded or connected, and checked before any engine
    starts: its vocabulary, and for a remote one that answers, its noise floor's dtype
    (when --dtype says it) and every --lora-modules adapter by content hash.
    ReferenceLoadError (exit 2) naming the reference otherwise."""
    try:
        scorer = load_reference(settings, settings.model, renderer.tokenizer,
                                trust_remote_code=settings.trust_remote_code, defer_unreachable=True)
    except VocabularyMismatchError as exc:  # it loaded, but cannot be compared with this candidate
        raise ReferenceRefusedError(str(exc)) from exc
    except (ShadowReferenceError, RemoteCodeError) as exc:  # the reference's own code, refused or failed
        raise ReferenceLoadError(str(exc)) from exc
    if scorer.state != "up":  # in process (None: adapters mount with the engine), or remote and not reachable yet
        return scorer
    try:
        if settings.shadow_noise_floor and settings.dtype != "auto":
            scorer.enable_noise_floor(settings.dtype)
        copies = settings.reference_lora_paths()
        for name, path in settings.lora_mounts():
            scorer.add_adapter(name, copies.get(name, path))
    except ShadowReferenceError as exc:
        asyncio.run(scorer.close())
        raise ReferenceRefusedError(str(exc)) from exc
    return scorer


def _shut_down(engine: Engine) -> None:
    """An engine started in this (load) thread, ended here: its processes with it."""
    try:
        asyncio.run(engine.shutdown())
    except Exception:  # the refusal that brought us here is what matters
        log.exception("the engine could not be shut down")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
