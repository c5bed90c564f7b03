"""The activation pass: where in the forward pass the candidate leaves its reference.

Both models run in fp32 on the same token ids, with hooks on every decoder layer: the
self-attention output, the MLP input (the residual after attention), the MLP output and
the layer's output (the residual stream). The reference also runs in the serving dtype:
its distance from the fp32 reference, per layer and site, is the noise envelope — what
precision alone does there. The first site where the candidate's relative error exceeds
`DEPARTURE` × the envelope is where it departs.

Models are loaded with transformers (no remote code). An InternLM2-layout checkpoint,
which transformers has no class for, runs on the project's native forward of the released
layout (adapters/native), not through the converter's mapping, so a converter bug cannot
sit on both sides; the report says how each side was loaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from pydantic import BaseModel
from tqdm import tqdm

from adapters.errors import AdapterError

SITES = ("attention", "mlp_input", "mlp", "residual")
SITE_NAMES = {"embedding": "embedding output", "attention": "self-attention output", "mlp_input": "MLP input",
              "mlp": "MLP output", "residual": "residual stream (layer output)"}
DEPARTURE = 4.0  # × the envelope: dtype controls peak at 2.0 (fp16), the attention-scale bug at 10 (docs/diagnose.md)
FLOOR = 1e-6  # relative errors below this are fp32 arithmetic, whatever the envelope
PROMPTS = (
    "The capital of France is Paris. The capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Water boils at 100 degrees Celsius at sea level, but on a high mountain it boils at a lower temperature because",
)


class SiteError(BaseModel):
    layer: int | None  # None: the embedding
    site: str
    candidate: float  # relative L2 error of the candidate vs the fp32 reference
    envelope: float  # the same for the reference in the serving dtype
    ratio: float

    @property
    def where(self) -> str:
        return SITE_NAMES[self.site] if self.layer is None else f"layer {self.layer}, {SITE_NAMES[self.site]}"


class LogitSummary(BaseModel):
    max_abs_logit_diff: float
    kl_mean: float  # KL(reference ‖ candidate) per prompt position, nats
    envelope_max_abs_logit_diff: float
    envelope_kl_mean: float


class ActivationReport(BaseModel):
    serving_dtype: str
    prompts: int
    tokens: int
    reference_loaded_as: str
    candidate_loaded_as: str
    sites: list[SiteError]
    first_departure: SiteError | None
    also_off: list[str]  # later sites of the same layer already beyond the envelope
    logits: LogitSummary


def load_model(path: Path, dtype: torch.dtype, device: str, adapter: Path | None = None):
    """(model, how it was loaded)."""
    from transformers import AutoModelForCausalLM

    from adapters.model_dir import exact_attention
    from adapters.native import DESCRIPTIONS, NATIVE, native_type

    if (kind := native_type(path)) is not None:
        if adapter is not None:
            raise AdapterError(f"{path}: an adapter on the native {kind} forward is not supported; convert the base first")
        model, how = NATIVE[kind](path, dtype, device), DESCRIPTIONS[kind]
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **exact_attention(path))
        except (OSError, ValueError, KeyError) as exc:
            raise AdapterError(f"{path}: transformers cannot load it ({exc})") from exc
        how = f"transformers {type(model).__name__}"
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        how += " + the unmerged adapter (peft)"
    return model.eval().to(device), how


def _decoder(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    if not hasattr(decoder, "layers"):
        raise AdapterError(f"{type(base).__name__}: no decoder layers to hook")
    return base, decoder


def _part(layer, *names):
    """A decoder layer's sub-module by its name in transformers' Llama-family (Gemma-2's too) or
    InternLM2's released layout: the first of `names` the layer has."""
    return next((getattr(layer, n) for n in names if hasattr(layer, n)), None)


def record(model, ids: torch.Tensor) -> tuple[dict[tuple[int | None, str], torch.Tensor], torch.Tensor]:
    """One forward pass: {(layer, site): activation [tokens, hidden] fp32 on CPU}, logits [tokens, vocab]."""
    base, decoder = _decoder(model)
    out: dict = {}

    def keep(key):
        def hook(module, args, output=None):
            value = output if output is not None else args[0]
            value = value[0] if isinstance(value, tuple) else value
            out[key] = value.detach()[0].float().cpu()
        return hook

    handles = [base.get_input_embeddings().register_forward_hook(keep((None, "embedding")))]
    for i, layer in enumerate(decoder.layers):
        if (attention := _part(layer, "self_attn", "attention")) is not None:
            handles.append(attention.register_forward_hook(keep((i, "attention"))))
        # The MLP's input norm: Gemma-2's post_attention_layernorm normalises the attention output
        # (pre_feedforward_layernorm is its MLP's), Llama's and InternLM2's read the residual.
        if (norm := _part(layer, "pre_feedforward_layernorm", "post_attention_layernorm", "ffn_norm")) is not None:
            handles.append(norm.register_forward_pre_hook(keep((i, "mlp_input"))))
        if (mlp := _part(layer, "mlp", "feed_forward")) is not None:
            handles.append(mlp.register_forward_hook(keep((i, "mlp"))))
        handles.append(layer.register_forward_hook(keep((i, "residual"))))
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids.to(next(model.parameters()).device)).logits[0].double().cpu()
    finally:
        for handle in handles:
            handle.remove()
    return out, logits


class _Distance:
    """Accumulates ‖a − ref‖² and ‖ref‖² per site, and logit statistics, over prompts."""

    def __init__(self):
        self.num: dict = {}
        self.den: dict = {}
        self.max_logit = 0.0
        self.kl_sum = 0.0
        self.positions = 0

    def add(self, acts, logits, ref_acts, ref_logits) -> None:
        for key, ref in ref_acts.items():
            if key in acts:
                self.num[key] = self.num.get(key, 0.0) + float((acts[key].double() - ref.double()).square().sum())
                self.den[key] = self.den.get(key, 0.0) + float(ref.double().square().sum())
        width = min(logits.shape[-1], ref_logits.shape[-1])
        p, q = ref_logits[:, :width].log_softmax(-1), logits[:, :width].log_softmax(-1)
        self.max_logit = max(self.max_logit, float((logits[:, :width] - ref_logits[:, :width]).abs().max()))
        self.kl_sum += float((p.exp() * (p - q)).sum(-1).clamp_min(0).sum())
        self.positions += p.shape[0]

    def relative(self, key) -> float:
        den = self.den.get(key, 0.0)
        return math.sqrt(self.num[key] / den) if den > 0 else 0.0


def activation_pass(candidate: Path, reference: Path, prompts: list[str], serving_dtype: torch.dtype,
                    adapter: Path | None = None, device: str = "cpu", progress: bool = True) -> ActivationReport:
    from transformers import AutoTokenizer

    from adapters.native import native_type
    from adapters.native.vocab import load_vocab

    if native_type(reference) is not None:  # its tokenizer class may be remote code: read the vocabulary natively
        tokenizer = load_vocab(reference)
    else:
        tokenizer = AutoTokenizer.from_pretrained(reference if (reference / "tokenizer_config.json").exists() else candidate)
    inputs = [torch.tensor([tokenizer.encode(p)]) for p in prompts]
    runs = [("reference", reference, torch.float32, adapter), ("envelope", reference, serving_dtype, adapter),
            ("candidate", candidate, torch.float32, None)]
    bar = tqdm(total=len(runs) * len(inputs), desc="activations", unit="pass", disable=not progress, leave=False)
    stored, distances, loaded = [], {}, {}
    for role, path, dtype, with_adapter in runs:
        model, loaded[role] = load_model(path, dtype, device, with_adapter)
        distance = _Distance()
        for i, ids in enumerate(inputs):
            acts, logits = record(model, ids)
            if role == "reference":
                stored.append((acts, logits))
            else:
                distance.add(acts, logits, *stored[i])
            bar.update()
        distances[role] = distance
        del model
    bar.close()
    cand, env = distances["candidate"], distances["envelope"]
    order = [(None, "embedding")] + [(i, s) for i in range(_layers(stored[0][0])) for s in SITES]
    sites = []
    for key in order:
        if key in cand.den:
            c, e = cand.relative(key), env.relative(key)
            sites.append(SiteError(layer=key[0], site=key[1], candidate=c, envelope=e,
                                   ratio=c / e if e > 0 else (0.0 if c == 0 else math.inf)))
    at = next((i for i, s in enumerate(sites) if _departs(s)), None)
    first = None if at is None else sites[at]
    also = [] if first is None else [SITE_NAMES[s.site] for s in sites[at + 1:] if s.layer == first.layer and _departs(s)]
    logits = LogitSummary(max_abs_logit_diff=cand.max_logit, kl_mean=cand.kl_sum / max(cand.positions, 1),
                          envelope_max_abs_logit_diff=env.max_logit, envelope_kl_mean=env.kl_sum / max(env.positions, 1))
    return ActivationReport(serving_dtype=str(serving_dtype).removeprefix("torch."), prompts=len(inputs),
                            tokens=sum(ids.shape[1] for ids in inputs), reference_loaded_as=loaded["reference"],
                            candidate_loaded_as=loaded["candidate"], sites=sites, first_departure=first, also_off=also,
                            logits=logits)


def _departs(site: SiteError) -> bool:
    return site.candidate > FLOOR and site.ratio > DEPARTURE


def _layers(acts: dict) -> int:
    return 1 + max((layer for layer, _ in acts if layer is not None), default=-1)
