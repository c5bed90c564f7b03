"""Divergence capture: one JSON line per diverged sequence, size-bounded with rotation.

Token ids decode back to the user's text with a public tokenizer, so ids and text are
one opt-in (`--shadow-capture-content`): without it a record holds per-position
statistics only (log-probs, KL, Δp, drift, whether the top-1s agree), no id and no
text. The files are created owner-only (0600), rotated ones included."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from collections.abc import Callable
from pathlib import Path

from shadow.compare import PositionStats, SequenceComparison

Decode = Callable[[list[int]], str]


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Opens (and, after each rotation, re-creates) the file with mode 0600; an existing
    file is narrowed to 0600 too. Rotation renames files, which keeps their mode."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.fchmod(fd, 0o600)
            return open(fd, self.mode, encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


class DivergenceCapture:
    def __init__(self, path: Path, max_bytes: int, backups: int, decode: Decode | None = None):
        """`decode` (the candidate tokenizer's) is given only with content capture on: then
        records also hold prompt/output ids, the ids at each position, and the text."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = _PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        # A private logger object (not registered by name): no global logging state touched.
        self._log = logging.Logger(f"shadow.capture.{path}", level=logging.INFO)
        self._log.addHandler(self._handler)
        self._decode = decode

    @property
    def content(self) -> bool:
        return self._decode is not None

    def write(
        self,
        *,
        request_id: str,
        model: str,
        reference: str,
        sequence: int,
        prompt_ids: list[int],
        output_ids: list[int],
        candidate: list[dict[int, float]],
        reference_stats: list[PositionStats],
        comparison: SequenceComparison,
    ) -> None:
        t = comparison.tokens
        positions = []
        for i, (token, cand, ref) in enumerate(zip(output_ids, candidate, reference_stats)):
            candidate_top1 = max(cand, key=cand.get)
            position = {
                "top1_agree": candidate_top1 == ref.top_ids[0],
                "candidate_logprob": cand[token],
                "reference_logprob": ref.logprobs[token],
                "reference_top_logprobs": list(ref.top_logprobs),
                "kl": float(t.kl[i]),
                "delta_p": float(t.delta_p[i]),
                "drift": float(t.drift[i]),
            }
            if self.content:
                position.update({
                    "token": token,
                    "candidate_top1": candidate_top1,
                    "reference_top1": ref.top_ids[0],
                    "reference_top": dict(zip(ref.top_ids, ref.top_logprobs)),
                })
            positions.append(position)
        record = {
            "time": time.time(),
            "request_id": request_id,
            "model": model,
            "reference": reference,
            "sequence": sequence,
            "result": comparison.result,
            "first_divergence": comparison.first_divergence,
            "margin": comparison.margin,
            "compared_tokens": comparison.compared_tokens,
            "prompt_tokens": len(prompt_ids),
            "output_tokens": len(output_ids),
        }
        if self._decode is not None:
            record.update({
                "prompt_ids": prompt_ids,
                "output_ids": output_ids,
                "prompt_text": self._decode(prompt_ids),
                "output_text": self._decode(output_ids),
            })
        record["positions"] = positions
        self._log.info(json.dumps(record))

    def close(self) -> None:
        self._handler.close()
