"""Reference scoring: the types every scorer shares and the wire format of the remote one.

A scorer teacher-forces each sequence: one forward pass over `prompt + output[:-1]`
gives, at each completion position, the reference's distribution given exactly the
prefix the candidate saw. It returns compact statistics (`PositionStats`), never vocab
rows: the reference log-probs of the candidate's ids and the reference's own top-m.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shadow.compare import PositionStats


MAX_BATCH_SEQUENCES = 256  # per reference batch, local or remote


class ReferenceError(RuntimeError):
    """The reference cannot be used (load failure, vocabulary mismatch, bad reply)."""


class ReferenceBusyError(ReferenceError):
    """The reference is still computing an earlier batch; this one is refused, not queued."""


@dataclass(frozen=True)
class ScoreItem:
    prompt_ids: list[int]
    output_ids: list[int]
    candidate_ids: list[list[int]]  # per output position: ids whose reference log-probs we need



@dataclass(frozen=True)
class VocabInfo:
    size: int
    sha256: str


def vocab_fingerprint(tokenizer) -> VocabInfo:
    """Teacher forcing runs over token ids: both sides must mean the same thing by each id."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return VocabInfo(len(tokenizer), digest)


def check_same_vocab(candidate: VocabInfo, reference: VocabInfo, reference_name: str) -> None:
    if candidate != reference:
        raise ReferenceError(
            f"the reference '{reference_name}' does not share the candidate's tokenizer "
            f"(vocabulary size {reference.size} vs {candidate.size}, sha256 {reference.sha256[:12]} vs "
            f"{candidate.sha256[:12]}); teacher forcing compares token ids, so both must use the same vocabulary"
        )


class Scorer(Protocol):
    name: str
    vocab: VocabInfo

    async def score(self, items: list[ScoreItem], top_m: int) -> list[list[PositionStats]]: ...

    async def close(self) -> None: ...


# --- wire format of POST /v1/shadow/score ----------------------------------------------


class ScoreItemBody(BaseModel):
    prompt_ids: list[int] = Field(min_length=1)
    output_ids: list[int] = Field(min_length=1)
    candidate_ids: list[list[int]]

    @model_validator(mode="after")
    def _aligned(self) -> ScoreItemBody:
        if len(self.candidate_ids) != len(self.output_ids):
            raise ValueError("candidate_ids needs one list per output token")
        return self


class ScoreRequestBody(BaseModel):
    items: list[ScoreItemBody] = Field(min_length=1, max_length=MAX_BATCH_SEQUENCES)
    top_m: int = Field(default=5, ge=1, le=100)


class PositionBody(BaseModel):
    # NaN/inf travel as JSON constants, so the comparison sees them and reports an error.
    model_config = ConfigDict(ser_json_inf_nan="constants")

    candidate_logprobs: list[float]  # aligned with the request's candidate_ids
    top_ids: list[int] = Field(min_length=1)
    top_logprobs: list[float] = Field(min_length=1)


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


def to_body(stats: list[PositionStats]) -> list[PositionBody]:
    return [
        PositionBody(
            candidate_logprobs=list(s.candidate_logprobs.values()), top_ids=s.top_ids, top_logprobs=s.top_logprobs
        )
        for s in stats
    ]


def from_body(item: ScoreItem, positions: list[PositionBody]) -> list[PositionStats]:
    if len(positions) != len(item.output_ids):
        raise ReferenceError(f"reference returned {len(positions)} positions for {len(item.output_ids)} tokens")
    out = []
    for ids, body in zip(item.candidate_ids, positions):
        if len(body.candidate_logprobs) != len(ids):
            raise ReferenceError("reference returned misaligned candidate log-probs")
        out.append(PositionStats(dict(zip(ids, body.candidate_logprobs)), body.top_ids, body.top_logprobs))
    return out
