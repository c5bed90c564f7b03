"""`shadowserve verify` settings: the candidate's engine, the reference, the inputs, the
report formats, and the verdict's limits (the same settings `serve` has)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import CliImplicitFlag, CliPositionalArg

from adapters.model_dir import check_model_dir
from server.settings import DType, EngineName, EngineSettings, VllmOptions
from shadow.placement import MaxMemory
from shadow.settings import VerdictSettings


class VerifySettings(VerdictSettings, VllmOptions):
    """Judge a candidate against its reference offline: the shadow pipeline on fixed prompts
    (or a corpus), the noise floor beside it, a report and a verdict. Exit code 0 pass,
    1 fail (or, with --strict, detectably different or a named departure in the config or
    weights), 3 inconclusive, 2 usage or load error."""

    candidate: CliPositionalArg[Path] = Field(description="the candidate's Hugging Face directory")
    reference: CliPositionalArg[Path] = Field(description="the reference's Hugging Face directory (run in fp32)")
    adapter: Path | None = Field(
        default=None, description="unmerged PEFT adapter on the reference (merged-LoRA candidates; with "
        "--candidate-adapter: the reference's own copy of it)")
    candidate_adapter: Path | None = Field(
        default=None, description="a PEFT LoRA adapter *mounted* on CANDIDATE by vLLM (its LoRA kernels, in --dtype), "
        "judged against REFERENCE + the same adapter unmerged in fp32: the mounted rows of the LoRA report")
    engine: EngineName = Field(default="vllm", description="the candidate's engine: vllm or transformers")
    dtype: DType = Field(default="auto", description="the candidate's serving dtype; the noise floor runs the reference in it")
    prompts: Path | None = Field(
        default=None, description="prompts file: JSONL of chat messages, or plain lines (default: a built-in set of 32)"
    )
    samples: int | None = Field(default=None, ge=1, description="use only the first N prompts (or corpus windows)")
    max_tokens: int = Field(default=64, ge=1, description="greedy tokens generated per prompt")
    corpus: Path | None = Field(
        default=None, description="text file: llama.cpp's mode, both sides teacher-forced over fixed text (nothing compounds)"
    )
    context: int = Field(default=256, ge=4, description="corpus window in tokens; its second half is scored")
    top_k: int = Field(default=20, ge=1, le=100, description="candidate (and noise-floor) log-probs compared per token")
    near_tie_margin: float = Field(default=0.25, ge=0, description="nats: a first divergence within it is near_tie, else hard")
    reference_device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N")
    reference_max_memory: MaxMemory = Field(
        default=None, description="spread the reference across devices within this memory per device, as "
        "serve's --shadow-reference-max-memory: '0=70GiB,1=70GiB', cpu=SIZE, disk=SIZE")
    trust_remote_code: bool = Field(
        default=False, description="run the Python code a model's directory names in its auto_map (candidate and reference)"
    )
    enforce_eager: bool = Field(default=True, description="vLLM: skip graph compilation (a one-off run starts faster)")
    kv_cache_gib: float | None = Field(default=None, gt=0, description="vLLM KV-cache size in GiB (set it on CPU hosts)")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="vLLM on GPU: its memory share (the fp32 reference shares the device)")
    max_model_len: int | None = Field(default=None, ge=16, description="context length (default: the model's)")
    json_report: CliImplicitFlag[bool] = Field(
        default=False, alias="json", description="print the report as JSON (the schema of GET /v1/shadow/verdict, plus "
        "`diagnosis`: the config and weight passes' findings)"
    )
    html: Path | None = Field(default=None, description="also write a self-contained HTML report with plots here")
    calibrate: CliImplicitFlag[bool] = Field(
        default=False,
        description="first measure the engine's own noise (the reference's weights served by this engine, dtype and "
                    "compile mode), write it to --verdict-calibration, then judge the candidate against it")
    check_weights: bool = Field(
        default=True,
        description="also run diagnose's config (tokenizer, template) and weight passes and list what they name under "
                    "the verdict (seconds for a small model; the weights stream one tensor pair at a time)")
    strict: CliImplicitFlag[bool] = Field(
        default=False,
        description="exit 1 when the candidate is detectably different from the noise floor, even within tolerance, "
                    "or when the config and weight passes name a departure (for conversions, which should equal the "
                    "original up to rounding)")

    @field_validator("candidate", "reference")
    @classmethod
    def _model_dir(cls, value: Path) -> Path:
        return check_model_dir(value)

    @field_validator("prompts", "corpus")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @model_validator(mode="after")
    def _one_input(self) -> VerifySettings:
        if self.corpus is not None and self.prompts is not None:
            raise ValueError("give --prompts or --corpus, not both")
        if self.calibrate and self.verdict_calibration is None:
            raise ValueError("--calibrate writes to --verdict-calibration FILE: give it")
        if self.candidate_adapter is not None and self.engine != "vllm":
            raise ValueError("--candidate-adapter is mounted by vLLM's LoRA kernels: it needs --engine vllm")
        self.engine_settings()  # the engine options are checked now, before anything loads
        return self

    def engine_settings(self, served_model_name: str | None = None) -> EngineSettings:
        """The candidate's engine as `serve` would load it, with the same vLLM options (and
        --candidate-adapter mounted as `served_model_name`, the base then served as BASE_NAME)."""
        lora = {}
        if self.candidate_adapter is not None:
            lora = {"lora_modules": [f"{served_model_name or ADAPTER_NAME}={self.candidate_adapter}"]}
            served_model_name = BASE_NAME
        return EngineSettings(
            model=self.candidate, served_model_name=served_model_name, engine=self.engine, dtype=self.dtype,
            max_model_len=self.max_model_len, max_logprobs=self.top_k, enforce_eager=self.enforce_eager,
            kv_cache_gib=self.kv_cache_gib, gpu_memory_utilization=self.gpu_memory_utilization,
            trust_remote_code=self.trust_remote_code,
            **lora, **self.model_dump(include=set(VllmOptions.model_fields)),
        )


BASE_NAME = "base"  # the candidate's base, when --candidate-adapter is what is judged
ADAPTER_NAME = "candidate-adapter"
