"""One assembly for every command: it builds a command's pieces in order and owns the
exit codes (docs/design.md, "Start-up and exit codes").

- `serve`: tokenizer → the shadow's reference (checked before any engine starts) →
  engine → calibration → the reference's self-check → shadow path → adapters, in the
  load thread (`assemble_serving`); then, on the event loop, the --lora-modules mounts,
  the self-check's first run and the shadow's worker (`bring_up`). A step that fails
  shuts down what the steps before it started, and is one `StartFailed` with its code.
- `verify` and the calibration child: the same shadow path on the same engine
  (`shadow_for`), judged offline; the verdict is the exit code (`VERDICT_EXIT`).
- `reference`: the fp32 scorer, its noise copy and its adapters (`assemble_reference`);
  every refusal exits 2 naming what (`refusals_exit`).

Exit codes, for every command: 0 ok (serve: a clean shutdown; verify: pass), 1 the
candidate failed (verify: fail; serve: its engine failed to load, did not start in time,
or died), 2 refused or misconfigured (bad flags or input, a reference that cannot be
used, a calibration of another engine, an adapter refused), 3 inconclusive (verify).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import IntEnum
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from server.engines import Engine, load_engine
from server.engines.facts import engine_facts
from server.errors import APIError
from server.serving.adapters import AdapterRegistry
from server.serving.context import ReferenceRefusedError, ServingContext
from server.serving.prompts import PromptRenderer
from server.serving.reference_probe import reference_self_check
from server.serving.validation import RequestValidator
from server.settings import EngineSettings, ServeSettings
from shadow.calibration import Calibration, CalibrationError, EngineFacts, load_calibration
from shadow.factory import build_shadow_path, load_reference
from shadow.path import ShadowPath
from shadow.remote_code import RemoteCodeError
from shadow.scoring import ReferenceLoadError, Scorer, ShadowReferenceError, VocabularyMismatchError
from shadow.settings import ShadowSettings

if TYPE_CHECKING:
    from server.reference_app import ReferenceSettings

log = logging.getLogger(__name__)

REFERENCE_CHECK_AT_START_S = 120.0  # one probe forward per side; a slower one goes on in the background


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the candidate failed: verify's "fail", serve's engine that failed or died
    REFUSED = 2  # refused or misconfigured (argparse's code for bad flags too)
    INCONCLUSIVE = 3  # verify could not decide yet


VERDICT_EXIT = {"pass": ExitCode.OK, "fail": ExitCode.FAILED, "inconclusive": ExitCode.INCONCLUSIVE}
CALIBRATION_UNAVAILABLE = 4  # the calibration child's own: "no engine serves this reference as it is"


class StartFailed(Exception):
    """A start that did not finish: what to print, and the process's exit code."""

    def __init__(self, message: str, code: ExitCode):
        super().__init__(message)
        self.message, self.code = message, code


def start_failure(exc: BaseException) -> tuple[str, ExitCode]:
    """What a failed start prints and exits with: the reference's side (exit 2, named as
    the reference's) or the engine's (exit 1). "engine failed to load" is only the engine's."""
    if isinstance(exc, CalibrationError):  # asked for, and not valid for this engine: never judge by a wrong floor
        log.error("%s", exc)
        return str(exc), ExitCode.REFUSED
    if isinstance(exc, ReferenceRefusedError):  # it loaded, but does not fit this server
        log.error("the reference was refused: %s", exc)
        return f"the reference was refused: {exc}", ExitCode.REFUSED
    if isinstance(exc, ReferenceLoadError):  # the engine was not even started: the reference is at fault
        log.error("the reference failed to load: %s", exc)
        return f"the reference failed to load: {exc}", ExitCode.REFUSED
    if isinstance(exc, APIError):  # a --lora-modules adapter the engine or the reference refused
        log.error("--lora-modules: %s", exc.message)
        return f"--lora-modules: {exc.message}", ExitCode.REFUSED
    log.exception("engine failed to load", exc_info=exc)
    return (f"engine failed to load: {exc!r}" if isinstance(exc, SystemExit) else f"engine failed to load: {exc}"), \
        ExitCode.FAILED


# --- serve ------------------------------------------------------------------------------


def assemble_serving(settings: ServeSettings, registry: CollectorRegistry) -> ServingContext:
    """Blocking (the load thread): tokenizer, the shadow's reference (checked first: a
    vocabulary mismatch fails fast), the engine (weights, and vLLM's engine-core process),
    then the noise floor in the dtype the engine really serves in. A refusal once the
    engine runs shuts the engine down before it is raised: nothing is left behind."""
    renderer = PromptRenderer.load(settings.model, settings.trust_remote_code)
    scorer = load_checked_reference(settings, renderer) if settings.shadow_enabled else None
    try:
        engine = load_engine(settings)
    except BaseException:
        _close(scorer)
        raise
    try:
        shadow = None
        if scorer is not None:
            shadow, _ = shadow_for(settings, settings, scorer, engine, renderer, registry, model_name=settings.model_name,
                                   calibration_path=settings.verdict_calibration, live=True)
        adapters = None
        if settings.lora_enabled:
            adapters = AdapterRegistry(engine, settings.model_name, settings.model, rank_limit=settings.lora_rank_cap(),
                                       capacity=settings.lora_capacity, shadow=shadow,
                                       reference_dir=settings.shadow_reference_model)
        return ServingContext(engine=engine, renderer=renderer, model_name=settings.model_name,
                              validator=RequestValidator.from_settings(settings), shadow=shadow, adapters=adapters)
    except BaseException:
        _shut_down_now(engine)
        _close(scorer)
        raise


def load_checked_reference(settings: ServeSettings, renderer: PromptRenderer) -> Scorer:
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
        _close(scorer)
        raise ReferenceRefusedError(str(exc)) from exc
    return scorer


def shadow_for(config: ShadowSettings, engine_settings: EngineSettings, scorer: Scorer, engine: Engine,
               renderer: PromptRenderer, registry: CollectorRegistry, *, model_name: str, calibration_path=None,
               extra_probes: Sequence[list[int]] = (), live: bool = False) -> tuple[ShadowPath, EngineFacts]:
    """Blocking: the shadow path over a started engine, as serve and verify both build it:
    the calibration (when a file is given: refused unless it was measured on this engine),
    the reference's self-check (`--verdict-reference-check`), then the path itself. `live`:
    a server's, paced by the engine's own load. A reference whose noise floor cannot run
    in the engine's dtype is a ReferenceRefusedError."""
    facts = engine_facts(engine_settings, engine, scorer.name)
    calibration: Calibration | None = None
    if calibration_path is not None:
        calibration = load_calibration(calibration_path, facts)
        log.info("shadow: noise floor %s", calibration.describe())
    check = None
    if config.verdict_reference_check:
        check = reference_self_check(engine, renderer, scorer, config.verdict_reference_max_excess_nats, extra_probes)
    try:
        shadow = build_shadow_path(config, scorer, model_name=model_name, serving_dtype=engine.dtype,
                                   candidate_tokenizer=renderer.tokenizer, registry=registry, self_check=check,
                                   calibration=calibration, engine_load=engine.pending if live else None)
    except ShadowReferenceError as exc:  # the reference's noise floor is not the engine's dtype
        raise ReferenceRefusedError(str(exc)) from exc
    return shadow, facts


async def bring_up(settings: ServeSettings, load_context: Callable[[ServeSettings, CollectorRegistry], ServingContext],
                   registry: CollectorRegistry, loaded: Callable[[], None]) -> ServingContext:
    """The server's start, in order: `load_context` on a thread of its own (within
    --start-timeout-s; `loaded()` once that thread is done), the --lora-modules mounts, the
    reference's self-check, the shadow's worker. StartFailed says why it did not finish;
    what had started is shut down first, also when the start is cancelled (SIGTERM)."""
    def load_in_thread() -> ServingContext:
        try:
            return load_context(settings, registry)
        finally:
            loaded()

    limit = settings.start_timeout_s or None
    try:
        ctx = await asyncio.wait_for(in_daemon_thread(load_in_thread), limit)
    except TimeoutError:  # the thread is left behind; the caller ends the process
        message = f"engine did not start within {limit:.0f}s (--start-timeout-s)"
        log.error("%s", message)
        raise StartFailed(message, ExitCode.FAILED) from None
    except (Exception, SystemExit) as exc:  # a library's SystemExit in the load thread too
        raise StartFailed(*start_failure(exc)) from exc
    try:
        if ctx.adapters is not None:
            await ctx.mount(settings.lora_mounts(), settings.reference_lora_paths())
        if ctx.shadow is not None:
            await check_reference_first(ctx.shadow)
            ctx.shadow.start()
    except (Exception, SystemExit) as exc:  # refused after the engine started (an adapter): nothing left behind
        await shut_down(ctx)
        raise StartFailed(*start_failure(exc)) from exc
    except asyncio.CancelledError:  # SIGTERM while the adapters mounted: the engine runs already
        await asyncio.shield(shut_down(ctx))
        raise
    return ctx


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


def _shut_down_now(engine: Engine) -> None:
    """An engine started in this (load) thread, ended here: its processes with it."""
    try:
        asyncio.run(engine.shutdown())
    except Exception:  # the refusal that brought us here is what matters
        log.exception("the engine could not be shut down")


def _close(scorer: Scorer | None) -> None:
    if scorer is None:
        return
    try:
        asyncio.run(scorer.close())
    except Exception:
        log.exception("the reference client could not be closed")


# --- reference --------------------------------------------------------------------------


@contextmanager
def refusals_exit() -> Iterator[None]:
    """Loading the reference (one process or a rank): its own refusals (its model, its code,
    an adapter that does not mount) exit 2 naming what, never a traceback."""
    from adapters.errors import AdapterError

    try:
        yield
    except (ShadowReferenceError, RemoteCodeError, AdapterError) as exc:
        print(f"shadowserve reference: {exc}", file=sys.stderr)
        sys.exit(ExitCode.REFUSED)


def assemble_reference(settings: ReferenceSettings):
    """Blocking: `shadowserve reference` in one process: the fp32 scorer, its noise copy,
    and the --lora-modules adapters; any refusal exits 2 naming what."""
    from server.reference_adapters import ReferenceAdapters
    from shadow.local_scorer import LocalScorer
    from shadow.placement import parse_max_memory

    with refusals_exit():
        scorer = LocalScorer.load(
            settings.model, settings.adapter, settings.device, settings.name, trust_remote_code=settings.trust_remote_code,
            max_memory=parse_max_memory(settings.max_memory) if settings.max_memory else None,
        )
        if settings.noise_dtype != "none":
            scorer.enable_noise_floor(settings.noise_dtype)
        adapters = ReferenceAdapters(scorer, settings.model, runtime_updating=settings.allow_runtime_lora_updating,
                                     capacity=settings.max_adapters)
        adapters.mount_at_start(settings.lora_mounts())
    return scorer, adapters
