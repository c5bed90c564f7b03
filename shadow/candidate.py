"""The candidate's log-probs of a queued sample, held compactly.

A sampled sequence waits in the shadow queue with, per output position, the engine's
raw top-k (+ the emitted token). As a list of `{token_id: logprob}` dicts that is about
2 KiB per token (a dict, boxed ints and boxed floats); here it is two flat arrays
(int32 ids, float32 log-probs: what the engines compute in) and one int32 offset per
position, 8 bytes per entry. Dicts come back only in the worker thread, just before
the comparison, so `shadow/compare.py` stays as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import chain

import numpy as np


class CandidateLogprobs:
    __slots__ = ("ids", "logprobs", "offsets")

    def __init__(self, ids: np.ndarray, logprobs: np.ndarray, offsets: np.ndarray):
        self.ids = ids  # int32, all positions' entries one after another
        self.logprobs = logprobs  # float32, aligned with ids
        self.offsets = offsets  # int32, len(positions) + 1: position i is [offsets[i], offsets[i + 1])

    @classmethod
    def pack(cls, entries: Iterable[Mapping[int, float]]) -> CandidateLogprobs:
        entries = entries if isinstance(entries, list) else list(entries)
        offsets = np.zeros(len(entries) + 1, dtype=np.int32)
        np.cumsum([len(e) for e in entries], out=offsets[1:])
        total = int(offsets[-1])
        ids = np.fromiter(chain.from_iterable(entries), dtype=np.int32, count=total)
        logprobs = np.fromiter(chain.from_iterable(e.values() for e in entries), dtype=np.float32, count=total)
        return cls(ids, logprobs, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _spans(self) -> list[tuple[int, int]]:
        offsets = self.offsets.tolist()
        return list(zip(offsets, offsets[1:]))

    def candidate_ids(self) -> list[list[int]]:
        """Per position, the ids whose reference log-probs the comparison needs."""
        ids = self.ids.tolist()
        return [ids[a:b] for a, b in self._spans()]

    def to_dicts(self) -> list[dict[int, float]]:
        """The `{token_id: logprob}` per position that `compare_sequence` takes."""
        ids, logprobs = self.ids.tolist(), self.logprobs.tolist()
        return [dict(zip(ids[a:b], logprobs[a:b])) for a, b in self._spans()]

    def head(self, n: int) -> CandidateLogprobs:
        """The first `n` positions (copies, so the rest is freed)."""
        end = int(self.offsets[n])
        return CandidateLogprobs(self.ids[:end].copy(), self.logprobs[:end].copy(), self.offsets[: n + 1].copy())

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.logprobs.nbytes + self.offsets.nbytes
