"""Engine calibration (docs/design.md, "Verdict v2"): how noisy the serving engine really is,
relative to the noise floor the shadow path computes.

The noise floor is the reference in the serving dtype *run by transformers*: a model of
the engine's noise. Diffy's secondary measures the real thing: the reference weights run
through the candidate's own engine, dtype and compile mode, teacher-forced or generated
against the fp32 reference over the same prompts. `shadowserve verify --calibrate` runs
exactly that (the reference served as if it were the candidate) and stores the ratio of
that engine noise to the transformers floor here; `serve` and `verify` read it with
`--verdict-calibration FILE` and judge against the floor scaled by it. The file names
what it was measured on, and is refused for any other engine, version, dtype, compile
mode, device or reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError


class CalibrationError(ValueError):
    """A calibration file that cannot be read, or was measured on something else."""


class EngineFacts(BaseModel):
    """What a calibration is only valid for."""

    engine: str  # vllm, transformers
    engine_version: str
    dtype: str  # the serving dtype
    compile_mode: str  # eager, compiled
    device: str  # cpu, cuda: the candidate engine's
    reference: str  # the reference model's directory name (its weights served as the candidate)


class Calibration(BaseModel):
    facts: EngineFacts
    kl_ratio: float  # engine KL / transformers-floor KL, same positions
    kl_ratio_low: float  # its confidence bounds (the verdict's)
    kl_ratio_high: float
    top1_ratio: float  # engine top-1 disagreements / the floor's
    sequences: int
    tokens: int
    measured_at: str  # ISO time

    def describe(self) -> str:
        f = self.facts
        return (f"calibrated to {f.engine} {f.engine_version} {f.dtype} {f.compile_mode} on {f.device}: its noise is "
                f"{self.kl_ratio:.3g}x the transformers floor's KL ({self.kl_ratio_low:.3g}-{self.kl_ratio_high:.3g}), "
                f"{self.top1_ratio:.3g}x its top-1 flips, over {self.sequences} sequences ({self.measured_at})")

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")


def load_calibration(path: Path, facts: EngineFacts | None = None) -> Calibration:
    """The calibration in `path`, checked against the engine about to be judged."""
    try:
        calibration = Calibration.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ValidationError) as exc:
        raise CalibrationError(f"cannot read the calibration {path}: {exc}") from exc
    if not (calibration.kl_ratio > 0 and calibration.top1_ratio >= 0):
        raise CalibrationError(f"the calibration {path} has a KL ratio of {calibration.kl_ratio}: not a noise scale")
    if facts is not None:
        wrong = [f"{name} {have!r} (the calibration's: {want!r})"
                 for name, want in calibration.facts.model_dump().items()
                 if (have := getattr(facts, name)) != want]
        if wrong:
            raise CalibrationError(
                f"the calibration {path} was measured on another setup: this run has {', '.join(wrong)}. "
                "Re-run `shadowserve verify --calibrate` with this engine's options, or drop --verdict-calibration")
    return calibration
