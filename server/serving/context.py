"""What every handler needs: the engine, the tokenizer, the served name and limits."""

from __future__ import annotations

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
from shadow.scoring import ReferenceLoadError, ShadowReferenceError

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
        the noise floor in the dtype the engine really serves in."""
        renderer = PromptRenderer.load(settings.model, settings.trust_remote_code)
        scorer = None
        if settings.shadow_enabled:
            try:
                scorer = load_reference(settings, settings.model, renderer.tokenizer,
                                        trust_remote_code=settings.trust_remote_code, defer_unreachable=True)
            except (ShadowReferenceError, RemoteCodeError) as exc:  # the reference's own code, refused or failed
                raise ReferenceLoadError(str(exc)) from exc
        engine = load_engine(settings)
        shadow = None
        calibration = None
        if scorer is not None and settings.verdict_calibration is not None:
            calibration = load_calibration(settings.verdict_calibration, engine_facts(settings, engine, scorer.name))
            log.info("shadow: noise floor %s", calibration.describe())
        if scorer is not None:
            check = (reference_self_check(engine, renderer, scorer, settings.verdict_reference_max_excess_nats)
                     if settings.verdict_reference_check else None)
            shadow = build_shadow_path(
                settings, scorer, model_name=settings.model_name, serving_dtype=engine.dtype,
                candidate_tokenizer=renderer.tokenizer, registry=registry, self_check=check, calibration=calibration,
                engine_load=engine.pending,
            )
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
        given), before serving (an APIError here stops the start, with its message)."""
        for name, path in mounts:
            await self.adapters.load(name, path, (reference_paths or {}).get(name))

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



def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
