"""`shadowserve verify --calibrate`: the serving engine's own noise (DESIGN.md, "Verdict
v2"; Diffy's secondary). The reference's weights are served by the candidate's engine,
dtype and compile mode, over the same prompts, and judged by the ordinary pipeline
against the fp32 reference and the transformers noise floor: the KL ratio it reads is the
engine's noise relative to that floor, stored for `--verdict-calibration`."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from server.verify.run import verify
from server.verify.settings import VerifySettings
from shadow.calibration import Calibration

log = logging.getLogger(__name__)


class CalibrationUnavailable(RuntimeError):
    """The engine cannot serve the reference as it is (an adapter, code it cannot run)."""


async def calibrate(settings: VerifySettings) -> Calibration:
    """Measure, save to `settings.verdict_calibration`, return. Raises CalibrationUnavailable."""
    if settings.adapter is not None:
        raise CalibrationUnavailable(
            "the reference is a base model with an unmerged adapter: no engine serves it as it is, so the engine's "
            "noise on it cannot be measured")
    run = settings.model_copy(update={"candidate": settings.reference, "calibrate": False, "verdict_calibration": None,
                                      "strict": False, "html": None})
    try:
        result = await verify(run)
    except Exception as exc:  # noqa: BLE001 (an engine that cannot load the reference: named, not fatal)
        raise CalibrationUnavailable(f"{settings.engine} could not serve the reference {settings.reference}: "
                                     f"{type(exc).__name__}: {exc}") from exc
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
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    calibration.save(settings.verdict_calibration)
    log.warning("engine calibration written to %s: %s", settings.verdict_calibration, calibration.describe())
    return calibration
