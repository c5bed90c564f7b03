"""`shadowserve verify --calibrate` and `serve --verdict-calibrate`: the serving engine's
own noise (docs/design.md, "Verdict v2"; Diffy's secondary). The reference's weights are
served by the candidate's engine, dtype and compile mode, over the same prompts, and
judged by the ordinary pipeline against the fp32 reference and the transformers noise
floor: the KL ratio it reads is the engine's noise relative to that floor, stored for
`--verdict-calibration`.

`serve` measures it in a child process (`python -m server.verify.calibrate`, the settings
as JSON on stdin) before the candidate's engine loads: the child's engine, reference and
noise floor are gone, memory included, before the server's own load."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from server.assembly import CALIBRATION_UNAVAILABLE, ExitCode
from server.settings import ServeSettings, VllmOptions
from server.verify.run import EngineLoadError, verify
from server.verify.settings import VerifySettings
from shadow.calibration import Calibration, CalibrationError
from shadow.settings import VerdictSettings

log = logging.getLogger("server.verify.calibrate")  # also when run as __main__ (the child)


class CalibrationUnavailable(RuntimeError):
    """The engine cannot serve the reference as it is (an adapter, code it cannot run)."""


def _adapter_reason(adapter: Path | None) -> str | None:
    if adapter is None:
        return None
    return ("the reference is a base model with an unmerged adapter: no engine serves it as it is, so the engine's "
            "noise on it cannot be measured")


async def calibrate(settings: VerifySettings) -> Calibration:
    """Measure, save to `settings.verdict_calibration`, return. Raises CalibrationUnavailable."""
    # A mounted candidate adapter is judged against the base engine's noise: measured on the
    # reference's base (its --adapter is then the reference's copy of the mounted adapter).
    mounted = settings.candidate_adapter is not None
    if not mounted and (reason := _adapter_reason(settings.adapter)) is not None:
        raise CalibrationUnavailable(reason)
    run = settings.model_copy(update={"candidate": settings.reference, "calibrate": False, "verdict_calibration": None,
                                      "strict": False, "html": None, "candidate_adapter": None,
                                      "adapter": None if mounted else settings.adapter})
    try:
        result = await verify(run)
    except EngineLoadError as exc:  # the engine cannot serve the reference as it is: named, not fatal
        raise CalibrationUnavailable(str(exc)) from exc
    # Anything else (out of memory, a reference that fails its self-check, samples that did not
    # compare) is a measurement that broke: it propagates (verify and serve exit 2).
    report, verdict = result.report, result.report.verdict
    kl = verdict.kl_ratio
    if kl is None or kl.low is None or kl.high is None or report.candidate is None or report.noise_floor is None:
        raise CalibrationUnavailable(f"too little to measure the engine's noise on: {'; '.join(verdict.reasons)}")
    flips = {name: (1 - side.same_top1.value) * side.tokens
             for name, side in (("engine", report.candidate), ("floor", report.noise_floor))}
    calibration = Calibration(
        facts=result.facts, kl_ratio=kl.estimate, kl_ratio_low=kl.low, kl_ratio_high=kl.high,
        top1_ratio=flips["engine"] / flips["floor"] if flips["floor"] > 0 else 1.0,
        sequences=report.candidate.sequences, tokens=report.candidate.tokens,
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    calibration.save(settings.verdict_calibration)
    log.warning("engine calibration written to %s: %s", settings.verdict_calibration, calibration.describe())
    return calibration


def serve_calibration(settings: ServeSettings) -> VerifySettings:
    """What `serve --verdict-calibrate` measures: its own engine options (vLLM's too, but
    not --quantization, a property of the candidate's checkpoint) on its local reference."""
    reference = settings.shadow_reference_model or settings.model
    vllm = settings.model_dump(include=set(VllmOptions.model_fields) - {"quantization"})
    return VerifySettings(
        candidate=reference, reference=reference, engine=settings.engine, dtype=settings.dtype,
        samples=settings.verdict_calibrate_samples, top_k=settings.shadow_top_k,
        near_tie_margin=settings.shadow_near_tie_margin, reference_device=settings.shadow_reference_device,
        reference_max_memory=settings.shadow_reference_max_memory, trust_remote_code=settings.trust_remote_code,
        enforce_eager=settings.enforce_eager, kv_cache_gib=settings.kv_cache_gib, max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        calibrate=True, **vllm, **settings.model_dump(include=set(VerdictSettings.model_fields)),
    )


def calibrate_before_serving(settings: ServeSettings, run=subprocess.run) -> ServeSettings:
    """`serve --verdict-calibrate`: measure the calibration file when it does not exist yet
    (one that exists is checked against the engine after it loads, as without the flag).
    Returns the settings to serve with: without a calibration when the engine cannot serve
    the reference as it is (said in the log; the transformers floor is kept). Raises
    CalibrationError when the measurement itself broke: out of memory, a reference that
    failed its self-check, the child killed (the server exits 2)."""
    path = settings.verdict_calibration
    if not settings.verdict_calibrate or path is None or path.exists():
        return settings
    uncalibrated = settings.model_copy(update={"verdict_calibration": None})
    if (reason := _adapter_reason(settings.shadow_reference_adapter)) is not None:
        log.warning("not calibrated: %s; judging against the transformers noise floor", reason)
        return uncalibrated
    job = serve_calibration(settings)
    log.warning("measuring the serving engine's own noise into %s before the candidate loads: the reference %s "
                "through %s (%s, %s), %d prompts x %d tokens", path, job.reference, job.engine, job.dtype,
                "eager" if job.enforce_eager else "compiled", job.samples, job.max_tokens)
    env = {**os.environ, "VLLM_LOGGING_STREAM": "ext://sys.stderr"}  # the child's stdout is its answer
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # nothing is served while it runs
    child = run([sys.executable, "-m", "server.verify.calibrate"], input=job.model_dump_json(by_alias=True),
                stdout=subprocess.PIPE, text=True, errors="replace", env=env)
    said = (child.stdout or "").strip()
    if child.returncode == 0 and path.exists():
        return settings
    if child.returncode == CALIBRATION_UNAVAILABLE:
        log.warning("not calibrated: %s; judging against the transformers noise floor", said)
        return uncalibrated
    raise CalibrationError(f"--verdict-calibrate: measuring the engine's noise into {path} failed (exit "
                           f"{child.returncode}): {said or 'its log is above'}")


def main() -> None:
    """The child `serve --verdict-calibrate` runs: VerifySettings as JSON on stdin; prints
    the calibration (exit 0), or why there is none: exit 4 when the engine cannot serve the
    reference as it is, 1 when the measurement broke, 2 for bad settings."""
    import asyncio

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = VerifySettings.model_validate_json(sys.stdin.read())
    except ValueError as exc:
        print(f"bad calibration settings: {exc}")
        sys.exit(ExitCode.REFUSED)
    try:
        calibration = asyncio.run(calibrate(settings))
    except CalibrationUnavailable as exc:
        print(exc)
        sys.exit(CALIBRATION_UNAVAILABLE)
    except Exception as exc:  # the measurement broke: one line for the server, the traceback in the log
        log.exception("the calibration failed")
        print(f"{type(exc).__name__}: {exc}")
        sys.exit(ExitCode.FAILED)
    print(calibration.describe())


if __name__ == "__main__":
    main()
