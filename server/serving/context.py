"""What every handler needs: the engine, the tokenizer, the served name and limits."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from server.engines import Engine, load_engine
from server.engines.facts import engine_facts
from server.errors import APIError, ModelNotFoundError
from server.serving.limits import RequestLimits
from server.serving.prompts import PromptRenderer
from server.serving.reference_probe import reference_self_check
from server.settings import ServeSettings
from shadow.calibration import load_calibration
from shadow.factory import build_shadow_path, load_reference
from shadow.path import ShadowPath
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
            except ShadowReferenceError as exc:
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
            )
        return cls(
            engine=engine,
            renderer=renderer,
            model_name=settings.model_name,
            max_n=settings.max_n,
            max_logprobs=settings.max_logprobs,
            limits=settings.request_limits,
            shadow=shadow,
        )

    def check_model(self, requested: str) -> None:
        if requested != self.model_name:
            raise ModelNotFoundError(
                f"The model '{requested}' does not exist; this server serves '{self.model_name}'",
                param="model",
            )


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse_response(events: AsyncIterator[BaseModel]) -> EventSourceResponse:
    """Server-sent events as OpenAI streams them: one JSON object per `data:` line and a
    final `data: [DONE]`. An error after the stream started is sent as an error event
    (the status line is already out), then the stream ends normally."""

    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event.model_dump_json()
        except APIError as exc:
            yield json.dumps(exc.body())
        except Exception:
            log.exception("stream failed")
            yield json.dumps(APIError("internal server error").body())
        yield "[DONE]"

    # No keep-alive comments (ping=0): neither OpenAI nor vLLM sends them, and clients that
    # parse SSE by hand lose events after one (vLLM's own `bench serve` client drops every
    # event that follows a comment line until two events share a read: usage included).
    return EventSourceResponse(lines(), ping=0, sep="\n")
