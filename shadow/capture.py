"""Divergence capture: one JSON line per diverged sequence, size-bounded with rotation.

Token ids and per-position statistics always; prompt/output text only when the operator
turns it on (it may hold user data)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from collections.abc import Callable
from pathlib import Path

from shadow.compare import PositionStats, SequenceComparison

Decode = Callable[[list[int]], str]


class DivergenceCapture:
    def __init__(self, path: Path, max_bytes: int, backups: int, decode: Decode | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        # A private logger object (not registered by name): no global logging state touched.
        self._log = logging.Logger(f"shadow.capture.{path}", level=logging.INFO)
        self._log.addHandler(self._handler)
        self._decode = decode

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
            "prompt_ids": prompt_ids,
            "output_ids": output_ids,
            "positions": [
                {
                    "token": token,
                    "candidate_top1": max(cand, key=cand.get),
                    "reference_top1": ref.top_ids[0],
                    "candidate_logprob": cand[token],
                    "reference_logprob": ref.logprobs[token],
                    "reference_top": dict(zip(ref.top_ids, ref.top_logprobs)),
                    "kl": float(t.kl[i]),
                    "delta_p": float(t.delta_p[i]),
                    "drift": float(t.drift[i]),
                }
                for i, (token, cand, ref) in enumerate(zip(output_ids, candidate, reference_stats))
            ],
        }
        if self._decode is not None:
            record["prompt_text"] = self._decode(prompt_ids)
            record["output_text"] = self._decode(output_ids)
        self._log.info(json.dumps(record))

    def close(self) -> None:
        self._handler.close()
