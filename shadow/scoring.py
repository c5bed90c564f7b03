"""Reference scoring: the types every scorer shares and the wire format of the remote one.

A scorer teacher-forces each sequence: one forward pass over `prompt + output[:-1]`
gives, at each completion position, the reference's distribution given exactly the
prefix the candidate saw. It returns compact statistics (`PositionStats`), never vocab
rows: the reference log-probs of the candidate's ids and the reference's own top-m.

With the noise floor on, the same prefixes also go through the reference in the
candidate's serving dtype; its top-k (+ the emitted token) comes back as a second
"candidate", and the fp32 log-probs cover its ids too, so `compare_sequence` judges
both the same way, over the same positions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shadow.compare import PositionStats

MAX_BATCH_SEQUENCES = 256  # per reference batch, local or remote


class ShadowReferenceError(RuntimeError):
    """The reference cannot be used (load failure, vocabulary or dtype mismatch, bad reply)."""


class ReferenceLoadError(ShadowReferenceError):
    """The reference could not be loaded or reached at start-up (the candidate may be fine)."""


class ReferenceBusyError(ShadowReferenceError):
    """The reference is still computing an earlier batch; this one is refused, not queued."""


class ReferenceUnavailableError(ShadowReferenceError):
    """The reference cannot answer now (unreachable, timed out, 429, 502-504, busy): a
    transient condition, so the shadow path keeps the samples and retries."""

    retry_after: float | None = None  # seconds the reference asked for (Retry-After), if it did


class AdapterUnavailableError(ShadowReferenceError):
    """The reference cannot apply a mounted adapter: it does not hold it (and may not load
    it), or holds other weights under its name. That adapter is served unshadowed."""


@dataclass(frozen=True)
class ScoreItem:
    prompt_ids: list[int]
    output_ids: list[int]
    candidate_ids: list[list[int]]  # per output position: ids whose reference log-probs we need


@dataclass(frozen=True)
class ScoredSequence:
    """The reference's answer for one item."""

    reference: list[PositionStats]  # fp32: at the candidate's ids (and the noise floor's), and its own top-m
    # The reference in the serving dtype, per position: its own top-k plus the emitted
    # token, {id: log-prob}. None when the noise floor was not asked for.
    noise: list[dict[int, float]] | None = None


@dataclass(frozen=True)
class VocabInfo:
    size: int
    sha256: str


def vocab_fingerprint(tokenizer) -> VocabInfo:
    """Teacher forcing runs over token ids: both sides must mean the same thing by each id."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return VocabInfo(len(tokenizer), digest)


class VocabularyMismatchError(ShadowReferenceError):
    """The reference does not share the candidate's tokenizer: teacher forcing cannot compare them."""


def check_same_vocab(candidate: VocabInfo, reference: VocabInfo, reference_name: str) -> None:
    if candidate != reference:
        raise VocabularyMismatchError(
            f"the reference '{reference_name}' does not share the candidate's tokenizer "
            f"(vocabulary size {reference.size} vs {candidate.size}, sha256 {reference.sha256[:12]} vs "
            f"{candidate.sha256[:12]}); teacher forcing compares token ids, so both must use the same vocabulary"
        )


class Scorer(Protocol):
    name: str
    vocab: VocabInfo
    noise_dtype: str | None  # the dtype the noise floor is computed in; None until enabled
    # Whether giving up on a slow call frees the reference. A remote call can be abandoned
    # (shadow_timeout_s bounds it); an in-process forward cannot be stopped: timing it out
    # would only count a batch that is still computing as an error and make the next one
    # wait behind it, so a slow local reference is bounded by the queue (drops) instead.
    cancellable: bool
    loaded_as: str  # how the reference model was loaded (a transformers class, the native forward, ...)
    # Parameters or buffers found unmaterialised or non-finite at load: the self-check refuses such a reference.
    integrity_problems: list[str]
    # Whether the reference answered its last call (the shadow_reference_up gauge); always for one in process.
    reachable: bool

    @property
    def ready(self) -> bool:
        """Whether samples can be scored now. False while a remote reference is not
        reachable yet, or disabled: the shadow path counts sampled requests as errors and
        leaves its self-check for later. An in-process reference is always ready."""
        ...

    @property
    def token_caps(self) -> tuple[int | None, int | None]:
        """The reference's own (per sequence, per padded batch) token caps, which the
        shadow path fits its forwards within besides its settings' budgets (a remote
        service answers 413 past them). None where it has none of its own or does not say:
        (None, None) for an in-process reference."""
        ...

    @property
    def state(self) -> str | None:
        """A remote reference's connection: "unreachable" (not answering yet; retried in the
        background once the shadow path is built), "up" or "disabled" (it answered but
        failed the checks). None for a reference with no connection (in-process)."""
        ...

    def enable_noise_floor(self, dtype: str) -> None:
        """Blocking: prepare the reference in the serving dtype, or raise ShadowReferenceError."""
        ...

    async def score(self, items: list[ScoreItem], top_m: int, noise_top_k: int | None = None,
                    adapter: str | None = None) -> list[ScoredSequence]:
        """`noise_top_k`: also score the noise floor, keeping its top-k per position.
        `adapter`: a mounted LoRA adapter to apply, unmerged (None: the reference as loaded)."""
        ...

    async def close(self) -> None: ...


# --- wire format of POST /v1/shadow/score ----------------------------------------------

SCORE_PATH = "/v1/shadow/score"  # served by server/reference_app.py, posted to by shadow/remote_scorer.py
LOAD_ADAPTER_PATH, UNLOAD_ADAPTER_PATH = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
ADAPTER_NOT_LOADED, ADAPTER_CONFLICT = "adapter_not_loaded", "adapter_conflict"  # the reference's error codes


class ScoreItemBody(BaseModel):
    prompt_ids: list[int] = Field(min_length=1)
    output_ids: list[int] = Field(min_length=1)
    candidate_ids: list[list[int]]

    @model_validator(mode="after")
    def _aligned(self) -> ScoreItemBody:
        if len(self.candidate_ids) != len(self.output_ids):
            raise ValueError("candidate_ids needs one list per output token")
        return self


class AdapterRef(BaseModel):
    """A mounted LoRA adapter as a score request names it: by name and content hash
    (adapters/lora_identity.py), so a reference holding other weights under that name
    refuses (409) instead of scoring them. `path`: where a reference that does not hold
    it may load it from, if it allows run-time loads (a restarted or new replica)."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^\S+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    path: str | None = Field(default=None, max_length=4096)


class AdapterInfo(BaseModel):
    """An adapter a reference service holds."""

    name: str
    sha256: str
    path: str
    pinned: bool = False  # mounted at start (--lora-modules): never unloaded at run time


class ScoreRequestBody(BaseModel):
    items: list[ScoreItemBody] = Field(min_length=1, max_length=MAX_BATCH_SEQUENCES)
    top_m: int = Field(default=5, ge=1, le=100)
    noise_top_k: int | None = Field(default=None, ge=1, le=100, description="also score the noise floor")
    adapter: AdapterRef | None = Field(default=None, description="score with this mounted LoRA adapter applied, unmerged")


class LoadAdapterBody(BaseModel):
    """POST /v1/load_lora_adapter on the reference (vLLM's field names)."""

    lora_name: str = Field(min_length=1, max_length=256, pattern=r"^\S+$")
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadAdapterBody(BaseModel):
    lora_name: str = Field(min_length=1, max_length=256)


class PositionBody(BaseModel):
    # NaN/inf travel as JSON constants, so the comparison sees them and reports an error.
    model_config = ConfigDict(ser_json_inf_nan="constants")

    candidate_logprobs: list[float]  # aligned with the request's candidate_ids
    top_ids: list[int] = Field(min_length=1)
    top_logprobs: list[float] = Field(min_length=1)
    # The noise floor (when asked): the serving-dtype reference's top-k + emitted token,
    # its log-probs, and the fp32 reference's log-probs at the same ids.
    noise_ids: list[int] | None = None
    noise_logprobs: list[float] | None = None
    noise_reference_logprobs: list[float] | None = None


class ScoreResponseBody(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")

    reference: str
    items: list[list[PositionBody]]


class ReferenceInfo(BaseModel):
    name: str
    vocab_size: int
    vocab_sha256: str
    dtype: str
    adapter: str | None = None
    noise_dtype: str | None = None  # the serving dtype its noise floor is computed in
    # The service's caps (413 past them), so its clients fit their batches to them.
    max_item_tokens: int | None = None
    max_request_tokens: int | None = None
    loaded_as: str | None = None  # how the service loaded its model
    integrity_problems: list[str] = []  # what its load-time integrity check found
    # Mounted LoRA adapters, each with its content hash; whether POST /v1/load_lora_adapter
    # (and loads named by a score request) are allowed, and how many adapters it holds at most.
    adapters: list[AdapterInfo] = []
    runtime_lora_updating: bool = False
    max_adapters: int = 0


def to_body(item: ScoreItem, scored: ScoredSequence) -> list[PositionBody]:
    out = []
    for i, (ids, s) in enumerate(zip(item.candidate_ids, scored.reference)):
        body = PositionBody(candidate_logprobs=[s.logprobs[t] for t in ids], top_ids=s.top_ids, top_logprobs=s.top_logprobs)
        if scored.noise is not None:
            noise = scored.noise[i]
            body.noise_ids = list(noise)
            body.noise_logprobs = list(noise.values())
            body.noise_reference_logprobs = [s.logprobs[t] for t in noise]
        out.append(body)
    return out


def from_body(item: ScoreItem, positions: list[PositionBody], noise: bool) -> ScoredSequence:
    if len(positions) != len(item.output_ids):
        raise ShadowReferenceError(f"reference returned {len(positions)} positions for {len(item.output_ids)} tokens")
    reference, noise_side = [], [] if noise else None
    for ids, body in zip(item.candidate_ids, positions):
        if len(body.candidate_logprobs) != len(ids):
            raise ShadowReferenceError("reference returned misaligned candidate log-probs")
        logprobs = dict(zip(ids, body.candidate_logprobs))
        if noise:
            n_ids, n_lp, n_ref = body.noise_ids, body.noise_logprobs, body.noise_reference_logprobs
            if n_ids is None or n_lp is None or n_ref is None or not len(n_ids) == len(n_lp) == len(n_ref):
                raise ShadowReferenceError("reference returned no or misaligned noise-floor log-probs")
            noise_side.append(dict(zip(n_ids, n_lp)))
            logprobs.update(zip(n_ids, n_ref))
        reference.append(PositionStats(logprobs, body.top_ids, body.top_logprobs))
    return ScoredSequence(reference, noise_side)
