"""verify's pipeline: the server's own pieces, offline. The candidate runs in the real
engine behind the real chat handler (admission, shadow tap); the shadow path scores it
and the noise floor on the reference, compares, keeps the history and judges it. Nothing
here computes a statistic of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from tqdm import tqdm

from server.assembly import shadow_for
from server.engines import load_engine
from server.protocol import ChatCompletionRequest
from server.serving.chat import ChatHandler
from server.serving.context import ServingContext
from server.serving.prompts import PromptRenderer
from server.serving.validation import RequestValidator
from server.verify.inputs import corpus_windows, load_prompts
from server.verify.settings import VerifySettings
from server.verify.structure import StructureCheck
from shadow.calibration import EngineFacts
from shadow.factory import load_reference
from shadow.history import ComparedSequence
from shadow.path import ShadowPath
from shadow.queue import ShadowSample, ShadowSequence
from shadow.reference_check import ReferenceUntrustedError
from shadow.report import ShadowReport
from shadow.settings import ShadowSettings, VerdictSettings

log = logging.getLogger(__name__)
CANDIDATE_NAME = "candidate"


class VerifyError(RuntimeError):
    """The run cannot give a verdict one can trust (samples that failed to compare)."""


class EngineLoadError(RuntimeError):
    """The candidate's engine could not load the candidate (its type and message kept)."""


@dataclass(frozen=True)
class VerifyResult:
    report: ShadowReport
    sequences: list[ComparedSequence]  # per-token detail, in arrival order, for the plots
    labels: dict[str, str]  # request id -> what was asked (the prompt, or the corpus window), in input order
    decode: Callable[[list[int]], str]  # the candidate's tokenizer, for token text in reports
    facts: EngineFacts | None = None  # the candidate's engine, as a calibration names it
    structure: StructureCheck | None = None  # diagnose's config and weight passes, beside the verdict


def shadow_settings(settings: VerifySettings, samples: int) -> ShadowSettings:
    """The shadow path as the server runs it, sampling every request, never dropping one."""
    return ShadowSettings(
        shadow_rate=1.0,
        shadow_top_k=settings.top_k,
        shadow_near_tie_margin=settings.near_tie_margin,
        shadow_reference_model=settings.reference,
        # A mounted candidate adapter goes onto the reference per request (run._mounted), not into its load.
        shadow_reference_adapter=settings.adapter if settings.candidate_adapter is None else None,
        shadow_reference_device=settings.reference_device,
        shadow_reference_max_memory=settings.reference_max_memory,
        shadow_queue_size=samples + 1,
        shadow_queue_tokens=2**62,
        shadow_max_duty=1.0,  # offline: no client to leave the host to
        shadow_reference_threads=0,
        shadow_reference_nice=0,
        shadow_timeout_s=3600.0,
        shadow_drain_s=0.0,
        shadow_verdict_max_sequences=samples + 1,
        **settings.model_dump(include=set(VerdictSettings.model_fields)),
    )


async def verify(settings: VerifySettings) -> VerifyResult:
    """Blocking loads run in threads; raises ShadowReferenceError, RemoteCodeError, InputError, VerifyError."""
    renderer = await asyncio.to_thread(PromptRenderer.load, settings.candidate, settings.trust_remote_code)
    if settings.corpus is None:
        work = load_prompts(settings.prompts, settings.samples)
    else:
        text = settings.corpus.read_text(encoding="utf-8")
        work = corpus_windows(renderer.text(text), settings.context, settings.samples)
    config = shadow_settings(settings, len(work))
    scorer = await asyncio.to_thread(
        load_reference, config, settings.candidate, renderer.tokenizer, trust_remote_code=settings.trust_remote_code)
    try:
        engine = await asyncio.to_thread(load_engine, settings.engine_settings(CANDIDATE_NAME))
    except Exception as exc:
        raise EngineLoadError(f"{settings.engine} could not load {settings.candidate}: {type(exc).__name__}: {exc}") from exc
    try:
        # llama.cpp's mode: the corpus is natural text too, so its first window joins the probe.
        extra = [] if settings.corpus is None else [work[0][0] + work[0][1]]
        calibration = None if settings.calibrate else settings.verdict_calibration
        shadow, facts = await asyncio.to_thread(
            shadow_for, config, settings.engine_settings(CANDIDATE_NAME), scorer, engine, renderer, CollectorRegistry(),
            model_name=CANDIDATE_NAME, calibration_path=calibration, extra_probes=extra)
        reference_check = await shadow.run_reference_check(retry=False)
        if reference_check is not None and not reference_check.trusted:
            await shadow.stop()
            raise ReferenceUntrustedError(
                f"refusing to judge the candidate against {settings.reference}: {'; '.join(reference_check.reasons)}. "
                f"{reference_check.summary()}. Check the reference first (--verdict-reference-check false skips this)")
        ctx = ServingContext(engine, renderer, CANDIDATE_NAME, RequestValidator(max_n=1, max_logprobs=settings.top_k),
                             shadow=shadow)
        lane = ""
        if settings.candidate_adapter is not None:  # the candidate is the adapter, mounted; the base is not judged
            ctx, lane = await _mounted(ctx, settings), CANDIDATE_NAME
        shadow.start()
        try:
            if settings.corpus is None:
                labels = await _generate(ctx, work, settings.max_tokens)
            else:
                labels = await _teacher_force(ctx, work, settings.top_k)
            await _scored(shadow, len(work), lane)
        finally:
            await shadow.stop()
        report = await asyncio.to_thread(shadow.report, None, True, lane)
        return VerifyResult(report, shadow.lane(lane).history.snapshot(), labels, renderer.tokenizer.decode, facts)
    finally:
        await engine.shutdown()


async def _mounted(ctx: ServingContext, settings: VerifySettings) -> ServingContext:
    """The context with --candidate-adapter mounted as CANDIDATE_NAME on the engine and the
    reference (the base served as BASE_NAME), as `serve --lora-modules` mounts one."""
    from server.serving.adapters import AdapterRegistry
    from server.verify.settings import BASE_NAME

    registry = AdapterRegistry(ctx.engine, BASE_NAME, settings.candidate,
                               rank_limit=settings.engine_settings(CANDIDATE_NAME).lora_rank_cap(), capacity=1,
                               shadow=ctx.shadow, reference_dir=settings.reference)
    await registry.load(CANDIDATE_NAME, settings.candidate_adapter, settings.adapter)
    return dataclasses.replace(ctx, model_name=BASE_NAME, adapters=registry)


async def _generate(ctx: ServingContext, conversations: list[list[dict]], max_tokens: int) -> dict[str, str]:
    """Greedy chat completions through the server's chat handler; each finished one is
    handed to the shadow path by the handler's own tap."""
    handler = ChatHandler(ctx)
    bar = tqdm(total=len(conversations), desc="generate", unit="prompt", leave=False)

    async def one(messages: list[dict]) -> str:
        body = {"model": CANDIDATE_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        response = await handler.create(ChatCompletionRequest.model_validate_json(json.dumps(body)))
        bar.update()
        return response.id

    try:
        ids = await asyncio.gather(*(one(m) for m in conversations))
    finally:
        bar.close()
    return {request_id: str(messages[-1].get("content")) for request_id, messages in zip(ids, conversations)}


async def _teacher_force(ctx: ServingContext, windows: list[tuple[list[int], list[int]]], k: int) -> dict[str, str]:
    """llama.cpp's mode: the candidate's prompt log-probs over each window; its scored half
    goes to the shadow path as if generated, so the reference sees exactly the same text."""
    bar = tqdm(total=len(windows), desc="candidate", unit="window", leave=False)

    async def one(n: int, context: list[int], scored: list[int]) -> None:
        adapter = ctx.resolve(CANDIDATE_NAME)  # the mounted --candidate-adapter, or None: the candidate itself
        entries = await ctx.engine.prompt_logprobs(context + scored, k, f"corpus-{n}", adapter)
        ctx.shadow.submit(ShadowSample(f"corpus-{n}", CANDIDATE_NAME,
                                       [ShadowSequence(context, scored, entries[len(context) - 1:])],
                                       adapter=adapter.name if adapter else "", adapter_id=adapter.id if adapter else 0))
        bar.update()

    try:
        await asyncio.gather(*(one(n, c, s) for n, (c, s) in enumerate(windows)))
    finally:
        bar.close()
    return {f"corpus-{n}": f"window {n}" for n in range(len(windows))}


async def _scored(shadow: ShadowPath, expected: int, lane: str = "") -> None:
    """Wait for the reference to score every sample; refuse a verdict on a subset."""
    bar = tqdm(total=expected, desc="reference", unit="seq", leave=False)
    metrics = shadow.lane(lane).metrics
    try:
        while (done := metrics.outcomes()) and sum(done.values()) < expected:
            bar.n = done["compared"]
            bar.refresh()
            await asyncio.sleep(0.2)
    finally:
        bar.close()
    failed = {k: int(v) for k, v in done.items() if k != "compared" and v}
    if failed.get("error") or failed.get("dropped"):
        raise VerifyError(
            f"{sum(failed.values())} of {expected} samples were not compared ({failed}); see the warnings above. "
            "A verdict on the rest could hide exactly what failed."
        )
