"""verify's structural check (diagnose's config and weight passes beside the verdict): when
it runs, when it says why not, and the lines it prints under the verdict. The passes
themselves are tested in tests/adapters/test_diagnose*.py; verify's end-to-end use in
tests/integration/test_verify_report.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.diagnose.findings import Finding
from server.verify.settings import VerifySettings
from server.verify.structure import StructureCheck, structure_check, structure_lines


def settings(candidate: Path, reference: Path, **extra) -> VerifySettings:
    return VerifySettings(candidate=candidate, reference=reference, **extra)


def model_dir(demo: Path, out: Path, config: dict | None = None, weights: dict | None = None) -> Path:
    out.mkdir()
    base = json.loads((demo / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**base, **(config or {})}))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (out / name).symlink_to(demo / name)
    if weights is None:
        (out / "model.safetensors").symlink_to(demo / "model.safetensors")
    else:
        save_file(weights, out / "model.safetensors")
    return out


def test_the_same_weights_run_and_depart_nowhere(demo_model):
    check = structure_check(settings(demo_model, demo_model))
    assert check.ran and not check.departs and check.weight_counts == {"identical": 272} and check.tensors == 272
    (line,) = structure_lines(check)
    assert line.startswith("Config and weights (diagnose): nothing departs beyond dtype rounding (272 tensors: "
                           "identical 272; ")


def test_it_says_why_it_did_not_run(demo_model, tmp_path):
    off = structure_check(settings(demo_model, demo_model, check_weights=False))
    assert not off.ran and off.reason == "--check-weights false" and not off.departs
    quantized = model_dir(demo_model, tmp_path / "awq", config={"quantization_config": {"quant_method": "awq"}})
    check = structure_check(settings(quantized, demo_model))
    assert not check.ran and "awq-quantized" in check.reason
    renamed = model_dir(demo_model, tmp_path / "renamed", weights={"transformer.h.0.attn.weight": torch.zeros(4, 4)})
    check = structure_check(settings(renamed, demo_model))
    assert not check.ran and check.reason.startswith("no tensor names in common (mapping identity)")
    assert structure_lines(check) == [f"Config and weights (diagnose): not compared: {check.reason}"]


def test_findings_are_numbered_under_the_verdict():
    check = StructureCheck(ran=True, tensors=272, weight_counts={"identical": 271, "scaled": 1}, seconds=2.0, findings=[
        Finding(source="weights", kind="scaled", summary="q_proj in layer 29 = 1.1000 × reference"),
        Finding(source="tokenizer", kind="chat_template", summary="chat_template: …")])
    assert check.departs
    assert structure_lines(check) == [
        "Config and weights (diagnose): 2 named departures, whatever the drift says (272 tensors: identical 271, "
        "scaled 1; 2.0 s):",
        "  1. [weights] q_proj in layer 29 = 1.1000 × reference",
        "  2. [tokenizer] chat_template: …"]


def test_rounding_beyond_alone_is_listed_but_not_a_named_departure():
    """A candidate merged in bf16: precision, which the drift verdict judges;
    `--strict` does not fail on it, and the lines do not call it nothing."""
    check = StructureCheck(ran=True, tensors=272, weight_counts={"rounding": 61, "rounding_beyond": 211}, seconds=2.0,
                           findings=[Finding(source="weights", kind="rounding_beyond", summary="q_proj …: rounding beyond")])
    assert not check.departs and check.strict_findings == []
    assert check.model_dump(mode="json")["departs"] is False
    lines = structure_lines(check)
    assert lines[0].startswith("Config and weights (diagnose): rounding beyond the dtype's own only (precision")
    assert lines[1] == "  1. [weights] q_proj …: rounding beyond"


def test_a_cast_through_float16_alone_is_not_a_named_departure():
    check = StructureCheck(ran=True, tensors=272, weight_counts={"rounding": 61, "cast_twice": 211}, seconds=2.0,
                           findings=[Finding(source="weights", kind="cast_twice", summary="… cast through float16, …")])
    assert not check.departs and check.strict_findings == []
