"""Precision-aware LoRA merge: merge in fp32 with peft, cast once to the save dtype, and
measure what the merge did on a probe prompt against the unmerged fp32 reference.

Why: a LoRA merged and saved in bf16 can answer wrongly in bf16 and fp16 (merging into
low-precision weights rounds the small LoRA update away); merged in fp32 and cast once,
it matches base + adapter. The measurement makes that visible instead of silent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.tensor_io import DTYPE_NAMES, PlannedTensor, write_provenance, write_safetensors

log = logging.getLogger(__name__)
PROBE = "The quick brown fox jumps over the lazy dog. Translate to French:"


@dataclass(frozen=True)
class MergeReport:
    max_abs_logit_diff: float  # merged (save dtype, run in serving dtype) vs unmerged fp32
    noise_floor: float  # unmerged base + adapter run in the serving dtype vs the same fp32 reference
    tolerance: float
    save_dtype: str
    serving_dtype: str
    warnings: tuple[str, ...]


def merge_lora(base: Path, adapter: Path, dst: Path, dtype: str = "fp32", serving_dtype: str | None = None,
               tolerance: float = 1e-2, probe: str = PROBE) -> MergeReport:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_dtype = DTYPE_NAMES[dtype]
    serve_dtype = DTYPE_NAMES[serving_dtype or dtype]
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = torch.tensor([tokenizer.encode(probe)])

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.inference_mode():
        want = reference(ids).logits.double()
        merged = reference.merge_and_unload()  # the fp32 merge; peft adds the scaled B @ A to W
    state = merged.state_dict()
    tied = merged.config.tie_word_embeddings
    plan = [
        PlannedTensor(name, tuple(t.shape), save_dtype if t.is_floating_point() else t.dtype,
                      lambda t=t: t.to(save_dtype) if t.is_floating_point() else t)
        for name, t in state.items()
        if not (tied and name == "lm_head.weight")
    ]
    dst.mkdir(parents=True, exist_ok=True)
    write_safetensors(plan, dst)
    merged.config.dtype = save_dtype
    merged.config.save_pretrained(dst)
    merged.generation_config.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    del merged, reference, state

    # Load what was written, as the server would, and compare with the reference.
    served = AutoModelForCausalLM.from_pretrained(dst, dtype=serve_dtype).eval()
    with torch.inference_mode():
        got = served(ids).logits.double()
    diff = float((got - want).abs().max())
    del served
    # What the serving dtype alone costs: base + unmerged adapter in that dtype. A merge
    # far above this floor lost the adapter's update; near it, the drift is precision.
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=serve_dtype), adapter).eval()
    with torch.inference_mode():
        floor = float((unmerged(ids).logits.double() - want).abs().max())
    del unmerged
    warnings = []
    if diff > tolerance:
        warnings.append(f"merged model drifts from base + adapter: max |Δlogit| {diff:.3g} > {tolerance:g} on the probe "
                        f"(the serving dtype alone, unmerged, gives {floor:.3g})")
    if serve_dtype != save_dtype:
        warnings.append(f"saved in {_name(save_dtype)} but served in {_name(serve_dtype)}: the cast happens twice; "
                        "save in the serving dtype")
    for warning in warnings:
        log.warning(warning)
    report = MergeReport(diff, floor, tolerance, _name(save_dtype), _name(serve_dtype), tuple(warnings))
    write_provenance(dst, tool="merge-lora", source=f"{base} + {adapter}", dtype=_name(save_dtype), rules=[
        "loaded base in fp32, applied the adapter with peft, merge_and_unload in fp32",
        f"cast once to {_name(save_dtype)} when writing",
    ], extra={"probe": {"prompt": probe, "serving_dtype": _name(serve_dtype), "max_abs_logit_diff": diff,
                        "noise_floor": floor, "tolerance": tolerance, "warnings": list(warnings)}})
    return report


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
