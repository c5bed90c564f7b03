"""Settings, read from `--flags` and `SHADOWSERVE_*` env: the engine's (shared by `serve`
and `verify`), and the server's, which add the HTTP side and the shadow path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapters.model_dir import check_model_dir, read_config
from shadow.settings import ShadowSettings

# Per-request limits' defaults, the flags' below and server.serving.validation.RequestValidator's own
# (docs/limits-and-security.md, "Request limits", says why each is what it is). Kept here, not in the
# validation module, so that the settings import no serving code.
MAX_MESSAGE_CHARS = 1_000_000
MAX_PROMPTS = 64
MAX_STOP_CHARS = 256
MAX_REQUEST_TOKENS = 262_144
MAX_N = 16
MAX_LOGPROBS = 20
MAX_REQUEST_BYTES = 8 * 2**20

EngineName = Literal["vllm", "transformers"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class VllmOptions(BaseModel):
    """vLLM's own engine options: `serve` and `verify` take the same ones."""

    tensor_parallel_size: int = Field(
        default=1, ge=1, description="vLLM: tensor-parallel degree (GPUs, or processes on CPU); the attention and KV "
        "head counts must divide by it")
    pipeline_parallel_size: int = Field(default=1, ge=1, description="vLLM: pipeline-parallel degree (layer stages)")
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        default=None, description="vLLM: workers as local processes (mp) or on a Ray cluster (default: vLLM's choice)")
    quantization: str | None = Field(
        default=None, description="vLLM: quantization method, e.g. awq, gptq, fp8 (default: the checkpoint's own)")
    max_num_seqs: int | None = Field(default=None, ge=1, description="vLLM: most sequences batched per step")
    enable_prefix_caching: bool | None = Field(default=None, description="vLLM: reuse KV blocks of shared prefixes")
    engine_arg: list[str] = Field(
        default_factory=list, description="vLLM: any other engine argument as KEY=VALUE (repeat the flag), checked by "
        "vLLM's own parser at start, e.g. block_size=32")


MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank takes
MaxLoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]


class LoraOptions(BaseModel):
    """Mounted LoRA adapters (vLLM's flags and semantics): one base, many adapters, chosen
    per request by its `model` field."""

    lora_modules: list[str] = Field(
        default_factory=list, description="vLLM: mount a PEFT LoRA adapter as NAME=DIR (repeat the flag), or as "
        "JSON {\"name\": ..., \"path\": ...}; a request whose `model` is NAME is generated with it, and shadowed "
        "against the reference + the adapter unmerged in fp32")
    enable_lora: bool = Field(
        default=False, description="vLLM: serve LoRA adapters (implied by --lora-modules and "
        "--allow-runtime-lora-updating)")
    max_loras: int | None = Field(default=None, ge=1, description="vLLM: most adapters in one batch (default: vLLM's, 1)")
    max_lora_rank: MaxLoraRank | None = Field(
        default=None, description="vLLM: the largest adapter rank (default: the smallest of vLLM's sizes that holds "
        "every --lora-modules rank, at least 16); a larger adapter is refused at start or load")
    max_cpu_loras: int | None = Field(
        default=None, ge=1, description="vLLM: most adapters mounted at once, all kept in memory by vLLM and by the "
        "shadow's reference (default: the larger of --max-loras and the number of --lora-modules); a load past it "
        "is refused")
    allow_runtime_lora_updating: bool = Field(
        default=False, description="POST /v1/load_lora_adapter and /v1/unload_lora_adapter, behind --api-keys (vLLM's "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING); a loaded adapter is shadowed at once")

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules) or self.allow_runtime_lora_updating

    def lora_mounts(self) -> list[tuple[str, Path]]:
        """--lora-modules as (name, directory) pairs."""
        return [parse_lora_module(item) for item in self.lora_modules]

    def lora_rank_cap(self) -> int:
        """The engine's --max-lora-rank: given, or the smallest of vLLM's sizes holding the
        --lora-modules ranks (read from their adapter_config.json)."""
        from adapters.lora_adapter import read_lora_adapter

        return self.lora_rank_limit([read_lora_adapter(path).rank for _, path in self.lora_mounts()])

    def lora_rank_limit(self, ranks: list[int] = ()) -> int:
        """--max-lora-rank, or the smallest of vLLM's sizes holding `ranks` (at least vLLM's 16)."""
        if self.max_lora_rank is not None:
            return self.max_lora_rank
        need = max([16, *ranks])
        return next((r for r in MAX_LORA_RANKS if r >= need), MAX_LORA_RANKS[-1])

    @property
    def lora_capacity(self) -> int:
        """Adapters mounted at once (--max-cpu-loras)."""
        return self.max_cpu_loras or max(self.max_loras or 1, len(self.lora_modules), 1)


def parse_lora_module(item: str) -> tuple[str, Path]:
    """vLLM's --lora-modules forms: NAME=DIR, or JSON with name and path."""
    text = item.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
            name, path = value["name"], value["path"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"--lora-modules {item!r}: expected NAME=DIR or JSON {{\"name\": ..., \"path\": ...}}") from exc
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise ValueError(f"--lora-modules {item!r}: expected NAME=DIR")
    name = str(name).strip()
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"--lora-modules {item!r}: the adapter's name must be non-empty, without spaces")
    return name, Path(str(path).strip())


def check_lora_mounts(settings: LoraOptions, model: Path, served_name: str) -> list[int]:
    """Every --lora-modules adapter read and checked against the base before any engine
    starts: a unique name other than the base's, a LoRA directory whose tensors fit the
    base, a rank within --max-lora-rank. Returns their ranks."""
    from adapters.lora_adapter import check_lora_adapter

    mounts = settings.lora_mounts()
    names = [name for name, _ in mounts]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"--lora-modules: the name {name!r} is given twice")
        if name == served_name:
            raise ValueError(f"--lora-modules: {name!r} is the base model's served name; give the adapter another name")
    if len(mounts) > settings.lora_capacity:
        raise ValueError(f"--lora-modules: {len(mounts)} adapters, but --max-cpu-loras is {settings.lora_capacity}")
    ranks = []
    for _name, path in mounts:
        info = check_lora_adapter(path, model)  # LoraAdapterError is a ValueError: an invalid setting
        ranks.append(info.rank)
    limit = settings.lora_rank_limit(ranks)
    for (name, _path), rank in zip(mounts, ranks):
        if rank > limit:
            raise ValueError(f"--lora-modules {name}: rank {rank} is above --max-lora-rank {limit}")
    if settings.max_loras is not None and settings.max_cpu_loras is not None and settings.max_cpu_loras < settings.max_loras:
        raise ValueError(f"--max-cpu-loras ({settings.max_cpu_loras}) must be at least --max-loras ({settings.max_loras})")
    return ranks


class EngineSettings(VllmOptions, LoraOptions):
    """What an engine needs to load a candidate."""

    model: Path = Field(description="local Hugging Face model directory (config.json, safetensors, tokenizer)")
    served_model_name: str | None = Field(
        default=None, description="name clients send as `model` (default: the directory's name)"
    )
    engine: EngineName = Field(default="vllm", description="vllm (default) or transformers (fallback, no batching)")
    dtype: DType = Field(default="auto", description="weights/activation dtype of the candidate")
    max_model_len: int | None = Field(
        default=None, ge=16, description="context length, prompt + completion (default: the model's)"
    )
    max_logprobs: int = Field(default=MAX_LOGPROBS, ge=0, description="largest top_logprobs/logprobs a client may ask for")
    enforce_eager: bool = Field(default=False, description="vLLM: skip graph compilation (faster start, slower decode)")
    kv_cache_gib: float | None = Field(
        default=None, gt=0, description="vLLM: KV-cache size in GiB (default: vLLM's share of memory; set it on CPU)"
    )
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="vLLM on GPU: memory share")
    seed: int = Field(default=0, description="engine seed (requests without `seed` still vary)")
    trust_remote_code: bool = Field(
        default=False, description="run the Python code in a model's directory (auto_map) for the candidate and the "
        "local reference; off: such a model is refused"
    )

    @field_validator("model")
    @classmethod
    def _model_dir_exists(cls, value: Path) -> Path:
        return check_model_dir(value)

    @model_validator(mode="after")
    def _engine_options(self):
        """vLLM-only options on the transformers engine are refused; for vLLM the parallel
        layout is checked against the model's head and layer counts, and --engine-arg by
        vLLM's parser, so a mistake stops the start before any weight is read."""
        from server.vllm_args import check_parallel, check_platform, parse_engine_args

        vllm_only = [name for name, field in {**VllmOptions.model_fields, **LoraOptions.model_fields}.items()
                     if getattr(self, name) != field.get_default(call_default_factory=True)]
        if self.engine != "vllm":
            if vllm_only:
                flags = ", ".join("--" + name.replace("_", "-") for name in vllm_only)
                raise ValueError(f"{flags}: vLLM engine options, not available with --engine {self.engine}")
            return self
        config = read_config(self.model)
        check_parallel(config.get("text_config", config), self.tensor_parallel_size, self.pipeline_parallel_size)
        if self.pipeline_parallel_size > 1 or self.distributed_executor_backend == "ray":
            from vllm.platforms import current_platform

            check_platform(self.pipeline_parallel_size, self.enforce_eager, self.distributed_executor_backend,
                           current_platform)
        if self.quantization is not None:
            from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

            if self.quantization not in QUANTIZATION_METHODS:
                raise ValueError(f"--quantization {self.quantization}: not a vLLM quantization method; "
                                 f"one of {', '.join(QUANTIZATION_METHODS)}")
        parse_engine_args(self.engine_arg)
        check_lora_mounts(self, self.model, self.model_name)
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name


class ServeSettings(BaseSettings, EngineSettings, ShadowSettings):
    """Run the OpenAI-compatible server on a candidate model, with the shadow path."""

    model_config = SettingsConfigDict(
        env_prefix="SHADOWSERVE_", cli_kebab_case=True, extra="ignore", frozen=True
    )

    host: str = Field(default="127.0.0.1", description="bind address")
    port: int = Field(default=8000, ge=0, le=65535, description="bind port")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="accepted bearer keys for /v1/*, /tokenize and /detokenize (env: comma-separated); none = no auth",
    )
    max_n: int = Field(default=MAX_N, ge=1, description="largest `n` (choices per request)")
    max_request_bytes: int = Field(default=MAX_REQUEST_BYTES, ge=1024, description="largest request body (413 above)")
    max_message_chars: int = Field(
        default=MAX_MESSAGE_CHARS, ge=1, description="largest chat message or completions prompt, in characters"
    )
    max_prompts: int = Field(default=MAX_PROMPTS, ge=1, description="largest batch of prompts in one completions request")
    max_stop_chars: int = Field(default=MAX_STOP_CHARS, ge=1, description="longest stop sequence, in characters")
    max_request_tokens: int = Field(
        default=MAX_REQUEST_TOKENS, ge=1,
        description="most tokens one request may ask to generate: prompts x n x max_tokens (or the context's room)",
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=0, description="on SIGTERM, time in-flight requests get to finish (then the shadow drains)"
    )
    start_timeout_s: float = Field(
        default=1800.0, ge=0,
        description="longest the engine may take to load and start, compilation included (0: no limit); "
                    "past it the server exits 1 (a vLLM start can hang after a failed compile)",
    )
    verdict_calibrate: bool = Field(
        default=False,
        description="at start, when the --verdict-calibration FILE does not exist yet, measure the serving engine's own "
                    "noise into it before the candidate loads (as `verify --calibrate`: the reference's weights through "
                    "this engine, dtype and compile mode, on verify's built-in prompts); a reference the engine cannot "
                    "serve as it is (an unmerged adapter) is named in the log and the transformers floor kept",
    )
    verdict_calibrate_samples: int = Field(
        default=32, ge=8, le=32, description="built-in prompts --verdict-calibrate measures on (64 greedy tokens each)")
    docs: bool = Field(default=False, description="serve /docs, /redoc and /openapi.json (off: the API surface stays unlisted)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    def reference_lora_paths(self) -> dict[str, Path]:
        """--shadow-reference-lora-modules: adapter name -> the reference's copy."""
        return dict(parse_lora_module(item) for item in self.shadow_reference_lora_modules)

    @model_validator(mode="after")
    def _shadow_fits(self) -> ServeSettings:
        if self.shadow_enabled and self.shadow_top_k > self.max_logprobs:
            raise ValueError(f"shadow-top-k ({self.shadow_top_k}) cannot exceed max-logprobs ({self.max_logprobs})")
        if not self.shadow_enabled and (given := self.reference_flags_given()):
            raise ValueError(f"{', '.join(given)} configure the shadow's reference, but the shadow is off (--shadow-rate "
                             "0 and no --shadow-allow-header): give --shadow-rate, or drop them")
        if self.shadow_enabled and self.lora_enabled:
            if self.shadow_reference_adapter is not None:
                raise ValueError("--shadow-reference-adapter is the reference of a merged candidate; with mounted "
                                 "adapters each request's own adapter is applied to the reference: give one or the other")
            from adapters.lora_adapter import check_lora_adapter

            mounted = dict(self.lora_mounts())
            copies = self.reference_lora_paths()
            for name in copies:
                if name not in mounted:
                    raise ValueError(f"--shadow-reference-lora-modules {name}: no --lora-modules adapter has that name")
            base = self.shadow_reference_model or self.model
            for name, path in mounted.items():  # what the reference mounts must fit the reference's base
                if self.shadow_reference_url is None and (copies.get(name, path) != path or base != self.model):
                    check_lora_adapter(copies.get(name, path), base)  # (a remote reference checks its own)
        elif self.shadow_reference_lora_modules:
            raise ValueError("--shadow-reference-lora-modules names the reference's adapters: it needs the shadow on "
                             "and --lora-modules")
        if self.verdict_calibrate:
            if self.verdict_calibration is None:
                raise ValueError("--verdict-calibrate writes to --verdict-calibration FILE: give it")
            if not self.shadow_enabled:
                raise ValueError("--verdict-calibrate calibrates the shadow's verdict: turn the shadow on (--shadow-rate)")
            if self.shadow_top_k > 100:
                raise ValueError("--verdict-calibrate measures with verify's pipeline, which compares at most 100 "
                                 "log-probs per token: --shadow-top-k must be at most 100")
            if self.dtype == "auto":
                raise ValueError("--verdict-calibrate serves the reference's weights in the candidate's dtype: give "
                                 "--dtype explicitly (auto would resolve from each checkpoint's own config)")
            if self.shadow_reference_url is not None:
                raise ValueError("--verdict-calibrate serves the reference's weights through this engine: it needs them "
                                 "here (--shadow-reference-model, or none: the candidate's own directory), not "
                                 "--shadow-reference-url; measure on the reference's host with `shadowserve verify "
                                 "--calibrate` and pass the file")
        return self
