"""verify's structural check: `diagnose`'s config (with tokenizer and template) and weight
passes run beside the drift verdict, so a named departure in the weights or the files
around them is shown even when the drift reads `pass` (a q_proj scaled by 1.10 in one
layer drifts ~1.1x the noise floor), and `--strict` fails on it. Seconds for the demo
model; the weight pass streams one tensor pair at a time, as `diagnose` does."""

from __future__ import annotations

import logging

from pydantic import BaseModel, computed_field

from adapters.diagnose.findings import PRECISION, Finding
from adapters.diagnose.run import diagnose
from adapters.errors import AdapterError
from adapters.model_dir import read_config
from server.verify.settings import VerifySettings

PASSES = ("config", "weights")
log = logging.getLogger(__name__)


class StructureCheck(BaseModel):
    """What the config and weight passes found; `reason` says why they did not run."""

    ran: bool
    reason: str | None = None
    findings: list[Finding] = []
    weight_counts: dict[str, int] | None = None
    tensors: int = 0
    seconds: float = 0.0

    @property
    def strict_findings(self) -> list[Finding]:
        """A named departure: everything but precision (`rounding_beyond`, `cast_twice`),
        which the drift verdict judges: a merge in bf16, a cast through fp16 then bf16. A
        config difference the weights show to change nothing (an untied output head equal to
        the embedding) is informational, never a finding."""
        return [f for f in self.findings if f.kind not in PRECISION]

    @computed_field
    @property
    def departs(self) -> bool:
        """What `--strict` exits 1 on."""
        return bool(self.strict_findings)


def structure_check(settings: VerifySettings) -> StructureCheck:
    """diagnose --only config,weights on the run's candidate and reference (for a mounted
    --candidate-adapter: the candidate's base against the reference's)."""
    if not settings.check_weights:
        return StructureCheck(ran=False, reason="--check-weights false")
    config = read_config(settings.candidate)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        return StructureCheck(ran=False, reason=f"the candidate is {method}-quantized: its tensors do not pair with "
                                                "the reference's one to one")
    adapter = settings.adapter if settings.candidate_adapter is None else None
    try:
        report = diagnose(settings.candidate, settings.reference, adapter=adapter, only=PASSES, device="cpu",
                          progress=False)
    except Exception as exc:  # the verdict stands on its own: say why this could not run, never lose the verdict
        log.warning("the config and weight passes failed", exc_info=not isinstance(exc, AdapterError))
        return StructureCheck(ran=False, reason=f"{type(exc).__name__}: {exc}")
    weights = report.weights or []
    if weights and all(r.kind in ("missing", "extra") for r in weights):
        return StructureCheck(ran=False, reason=f"no tensor names in common (mapping {report.mapping}): the "
                                                "checkpoints' tensors cannot be paired")
    return StructureCheck(ran=True, findings=report.findings, weight_counts=report.weight_counts,
                          tensors=sum(1 for r in weights if r.kind != "extra"), seconds=sum(report.seconds.values()))


def structure_lines(check: StructureCheck | None) -> list[str]:
    """The text report's block, under the verdict."""
    if check is None:
        return []
    if not check.ran:
        return [f"Config and weights (diagnose): not compared: {check.reason}"]
    counts = ", ".join(f"{kind} {n}" for kind, n in sorted((check.weight_counts or {}).items(), key=lambda kv: -kv[1]))
    what = f"{check.tensors} tensors: {counts}; {check.seconds:.1f} s"
    if not check.findings:
        return [f"Config and weights (diagnose): nothing departs beyond dtype rounding ({what})"]
    named = len(check.strict_findings)
    head = (f"{named} named departure{'s' if named != 1 else ''}, whatever the drift says" if named
            else "rounding beyond the dtype's own only (precision: the drift verdict judges it)")
    lines = [f"Config and weights (diagnose): {head} ({what}):"]
    lines += [f"  {i}. [{f.source}] {f.summary}" for i, f in enumerate(check.findings, 1)]
    return lines
