"""`shadowserve diagnose`: the three passes, each usable alone, and the joined report. The
config pass reads config.json, and the tokenizer, generation_config.json and chat template
around it (adapters/diagnose/tokenizers.py)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch
from pydantic import BaseModel

from adapters.diagnose.activations import PROMPTS, ActivationReport, activation_pass
from adapters.diagnose.configs import ConfigDifference, diff_configs
from adapters.diagnose.findings import Facts, Finding, rank_findings, settle_tied_head
from adapters.diagnose.forensics import TensorResult
from adapters.diagnose.tokenizers import tokenizer_pass
from adapters.diagnose.weights import NOT_A_MODEL_DIR, adapter_targets, resolve_mapping, weight_pass
from adapters.errors import AdapterError
from adapters.model_dir import read_config
from adapters.tensor_io import DTYPE_NAMES

PASSES = ("config", "weights", "activations")


class DiagnoseReport(BaseModel):
    candidate: str
    reference: str
    adapter: str | None
    mapping: str
    passes: list[str]
    departs: bool  # something departs beyond dtype rounding and the envelope (exit 1)
    findings: list[Finding]
    config: list[ConfigDifference] | None = None
    weights: list[TensorResult] | None = None
    weight_counts: dict[str, int] | None = None
    activations: ActivationReport | None = None
    facts: Facts
    seconds: dict[str, float] = {}


def serving_dtype(candidate_config: dict, requested: str | None) -> torch.dtype:
    """The dtype the candidate will be served in: as asked, else its stored dtype when that
    is bf16/fp16, else bf16 (what a GPU deployment serves)."""
    if requested:
        return DTYPE_NAMES[requested]
    stored = DTYPE_NAMES.get(str(candidate_config.get("dtype") or candidate_config.get("torch_dtype") or ""))
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16


def facts(reference_config: dict, adapter: Path | None) -> Facts:
    heads = reference_config["num_attention_heads"]
    return Facts(reference_config["num_hidden_layers"], reference_config.get("head_dim") or reference_config["hidden_size"] // heads,
                 frozenset(adapter_targets(adapter)))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdapterError(f"--device {device}: no CUDA device is available")
    return device


def diagnose(candidate: Path, reference: Path, *, adapter: Path | None = None, mapping: str = "auto",
             prompts: list[str] | None = None, only: tuple[str, ...] = PASSES, dtype: str | None = None,
             device: str = "cpu", progress: bool = True) -> DiagnoseReport:
    cand_config = read_config(candidate, message=NOT_A_MODEL_DIR)
    ref_config = read_config(reference, message=NOT_A_MODEL_DIR)
    mapping = resolve_mapping(mapping, cand_config, ref_config)
    device = resolve_device(device)
    unknown = set(only) - set(PASSES)
    if unknown or not only:
        raise AdapterError(f"--only takes {', '.join(PASSES)} (got {', '.join(sorted(unknown)) or 'nothing'})")
    report: dict = {"config": None, "weights": None, "activations": None}
    seconds = {}
    for name in PASSES:
        if name not in only:
            continue
        start = time.perf_counter()
        if name == "config":
            report["config"] = diff_configs(cand_config, ref_config) + tokenizer_pass(candidate, reference)
        elif name == "weights":
            report["weights"] = weight_pass(candidate, reference, mapping, adapter, device, progress)
        else:
            report["activations"] = activation_pass(candidate, reference, list(prompts or PROMPTS),
                                                    serving_dtype(cand_config, dtype), adapter, device, progress)
        seconds[name] = time.perf_counter() - start
    known = facts(ref_config, adapter)
    report["config"] = settle_tied_head(report["config"], report["weights"])  # the table says what the findings do
    findings = rank_findings(report["config"], report["weights"], report["activations"], known)
    counts = None if report["weights"] is None else dict(Counter(r.kind for r in report["weights"]))
    return DiagnoseReport(candidate=str(candidate), reference=str(reference), adapter=str(adapter) if adapter else None,
                          mapping=mapping, passes=[p for p in PASSES if p in only], departs=bool(findings),
                          findings=findings, weight_counts=counts, facts=known, seconds=seconds, **report)
