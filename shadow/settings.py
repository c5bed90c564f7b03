"""Shadow settings. The server's settings class inherits these, so each is a flag
(`--shadow-rate`) and an env variable (`SHADOWSERVE_SHADOW_RATE`) like every other."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode

from shadow.placement import MaxMemory
from shadow.reference_check import MAX_EXCESS_NATS
from shadow.verdict import VerdictPolicy

_DEFAULT = VerdictPolicy()
REFERENCE_NAMING = ("shadow_reference_url", "shadow_reference_token", "shadow_reference_model", "shadow_reference_adapter",
                    "shadow_reference_lora_modules", "shadow_reference_name")


class VerdictSettings(BaseModel):
    """The verdict's limits (shared by `serve` and `verify`); docs/verdict.md, "The tolerance",
    says why each default is what it is."""

    verdict_kl_ratio_max: float = Field(
        default=_DEFAULT.kl_ratio_max, gt=0, description="fail when mean token KL exceeds this multiple of the noise floor's"
    )
    verdict_excess_top1_max: float = Field(
        default=_DEFAULT.excess_top1_max, ge=0, le=1,
        description="fail when top-1 disagreement exceeds the noise floor's by more than this share of tokens",
    )
    verdict_excess_hard_max: float = Field(
        default=_DEFAULT.excess_hard_max, ge=0, le=1,
        description="fail when hard divergences exceed the noise floor's by more than this share of sequences",
    )
    verdict_min_sequences: int = Field(default=_DEFAULT.min_sequences, ge=2, description="inconclusive below this many sequences")
    verdict_min_tokens: int = Field(default=_DEFAULT.min_tokens, ge=1, description="inconclusive below this many compared tokens")
    verdict_confidence: float = Field(
        default=_DEFAULT.confidence, gt=0.5, lt=1,
        description="confidence of the verdict's intervals: confidence sequences, valid however often it is read"
    )
    verdict_noise_kl_floor: float = Field(
        default=_DEFAULT.noise_kl_floor, gt=0, description="nats/token: smallest noise-floor KL a ratio is taken against (fp32)"
    )

    verdict_calibration: Path | None = Field(
        default=None,
        description="engine calibration file (written by `shadowserve verify --calibrate`): judge against the noise "
                    "floor scaled to the serving engine's measured noise; refused if measured on another setup",
    )

    verdict_reference_check: bool = Field(
        default=True,
        description="before judging, score a built-in probe text on reference and candidate; refuse a reference far "
                    "worse than its candidate, or with unmaterialised / non-finite tensors",
    )
    verdict_reference_max_excess_nats: float = Field(
        default=MAX_EXCESS_NATS, gt=0,
        description="nats/token: the most the reference's probe log-loss may exceed the candidate's (precision "
                    "noise is ~1e-3; 0.25 is perplexity x1.28)",
    )

    @property
    def verdict_policy(self) -> VerdictPolicy:
        return VerdictPolicy(
            kl_ratio_max=self.verdict_kl_ratio_max,
            excess_top1_max=self.verdict_excess_top1_max,
            excess_hard_max=self.verdict_excess_hard_max,
            min_sequences=self.verdict_min_sequences,
            min_tokens=self.verdict_min_tokens,
            confidence=self.verdict_confidence,
            noise_kl_floor=self.verdict_noise_kl_floor,
        )


class ShadowSettings(VerdictSettings):
    shadow_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="share of requests replayed against the reference (0 = off)"
    )
    shadow_allow_header: bool = Field(
        default=False, description="honour the per-request header `X-Shadow: always|never` (off: clients cannot flood the reference)"
    )
    shadow_top_k: int = Field(default=20, ge=1, description="candidate log-probs kept per token for comparison (<= max-logprobs)")
    shadow_reference_top_m: int = Field(default=5, ge=1, description="reference's own top-m kept per position (capture, top-1)")
    shadow_near_tie_margin: float = Field(
        default=0.25, ge=0.0, description="nats: a first divergence within this reference margin is `near_tie`, else `hard`"
    )
    shadow_noise_floor: bool = Field(
        default=True,
        description="also score the reference in the serving dtype (comparison=noise_floor): the scale the verdict judges by",
    )
    shadow_verdict_max_sequences: int = Field(
        default=2048, ge=1, description="compared sequences kept in memory for GET /v1/shadow/verdict"
    )
    shadow_reference_model: Path | None = Field(
        default=None, description="local reference directory, run in fp32 (default: the candidate's own directory)"
    )
    shadow_reference_adapter: Path | None = Field(
        default=None, description="unmerged PEFT adapter applied on the local reference (reference for a merged-LoRA candidate)"
    )
    shadow_reference_lora_modules: list[str] = Field(
        default_factory=list, description="the reference's own copy of a mounted adapter, NAME=DIR (repeat the flag): "
        "e.g. the adapter as trained, when the one mounted was converted (default: each --lora-modules directory)")
    shadow_reference_url: str | None = Field(
        default=None, description="remote reference (`shadowserve reference`) base URL; replaces the local reference"
    )
    shadow_reference_token: SecretStr | None = Field(default=None, description="bearer token for the remote reference")
    shadow_reference_name: str | None = Field(
        default=None, description="`reference` label value (default: the reference's directory or service name)"
    )
    shadow_reference_device: str = Field(default="auto", description="local reference device: auto, cpu, cuda, cuda:N")
    shadow_reference_max_memory: MaxMemory = Field(
        default=None, description="spread the local reference across devices with accelerate's device map, "
        "within this memory per device: '0=70GiB,1=70GiB' (GPU indices), cpu=SIZE, disk=SIZE (offload, slow); "
        "a reference that does not fit stops the start")
    shadow_queue_size: int = Field(default=256, ge=1, description="samples waiting for the reference; more are dropped and counted")
    shadow_batch_tokens: int = Field(default=2048, ge=1, description="token budget of one reference batch (prompt + output)")
    shadow_queue_tokens: int = Field(
        default=65536, ge=1, description="prompt + output tokens waiting for the reference; a sample past it is dropped and counted"
    )
    shadow_max_tokens: int | None = Field(
        default=None, ge=1,
        description="longest sequence scored (default: --shadow-batch-tokens, at most that): longer ones are cut to "
        "their first N tokens of prompt + output, or skipped when the prompt leaves no output token",
    )
    shadow_max_duty: float = Field(
        default=0.25, gt=0, le=1,
        description="share of time the reference may compute: after a batch of t s it idles t*(1-d)/d (1 = no pause)",
    )
    shadow_reference_threads: int = Field(
        default=1, ge=0,
        description="torch threads of the in-process reference's forwards (0: unchanged)",
    )
    shadow_reference_nice: int = Field(
        default=10, ge=0, le=19, description="the in-process reference's thread runs this much lower in priority (Linux nice)"
    )
    shadow_timeout_s: float = Field(
        default=60.0, gt=0, description="a remote reference batch slower than this is abandoned and tried again later "
        "(a local forward cannot be abandoned: a slow one makes the queue drop instead)")
    shadow_max_sample_age_s: float = Field(
        default=600.0, gt=0, description="a sample the reference could not score (unreachable, timed out, 429, "
        "502-504, busy) stays queued and is retried until it is this old, then counts as an error (default: a restart "
        "of a large reference, loading included)")
    shadow_drain_s: float = Field(default=10.0, ge=0, description="on shutdown, time to finish queued samples; the rest count as dropped")
    shadow_labels: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="constant labels on every shadow series, e.g. variant=canary,zone=a"
    )
    shadow_capture_path: Path | None = Field(default=None, description="JSONL file of diverged samples (off when unset)")
    shadow_capture_max_mb: float = Field(default=64.0, gt=0, description="capture file size before rotation")
    shadow_capture_backups: int = Field(default=3, ge=0, description="rotated capture files kept")
    shadow_capture_content: bool = Field(
        default=False,
        description="also write prompt/output token ids and text into captures (ids decode to the user's text)",
    )
    shadow_capture_text: bool | None = Field(
        default=None, description="deprecated alias of --shadow-capture-content", exclude=True
    )

    @model_validator(mode="before")
    @classmethod
    def _capture_text_alias(cls, data: object) -> object:
        """`shadow_capture_text` (its old name) still turns content capture on."""
        if isinstance(data, dict) and data.get("shadow_capture_text") is not None:
            logging.getLogger(__name__).warning("--shadow-capture-text is deprecated: use --shadow-capture-content")
            if data.get("shadow_capture_content") is None:
                data = {**data, "shadow_capture_content": data["shadow_capture_text"]}
        return data

    @field_validator("shadow_max_tokens")
    @classmethod
    def _max_tokens_fit_a_batch(cls, value: int | None, info) -> int | None:
        batch = info.data.get("shadow_batch_tokens")
        if value is not None and batch is not None and value > batch:
            raise ValueError(f"must be at most --shadow-batch-tokens ({batch}): no reference forward exceeds the batch budget")
        return value

    @field_validator("shadow_labels", mode="before")
    @classmethod
    def _parse_labels(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("labels look like name=value,name=value")
            return {k.strip(): v.strip() for k, v in pairs}
        return value

    @field_validator("shadow_labels")
    @classmethod
    def _valid_label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        reserved = {"model", "reference", "adapter", "comparison", "outcome", "result", "top1", "le", "statistic",
                    "bound", "action"}
        for name in labels:
            if not name.isidentifier() or name.startswith("__") or name in reserved:
                raise ValueError(f"'{name}' cannot be a constant label name")
        return labels

    @property
    def shadow_sequence_tokens(self) -> int:
        """The longest sequence (prompt + output) a reference forward takes."""
        return self.shadow_max_tokens or self.shadow_batch_tokens

    @property
    def shadow_enabled(self) -> bool:
        return self.shadow_rate > 0 or self.shadow_allow_header

    def reference_flags_given(self) -> list[str]:
        """The flags that name a reference (which model, adapters, service, credentials),
        set away from their defaults: they configure a shadow that only runs when it is on.
        The local reference's tuning (device, threads, nice, memory) is not among them."""
        return ["--" + name.replace("_", "-") for name in REFERENCE_NAMING
                if getattr(self, name) != ShadowSettings.model_fields[name].get_default(call_default_factory=True)]
