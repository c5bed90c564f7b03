"""Scorer doubles for fault injection: they stand in for the reference model only where
a test needs it to agree exactly, flip a position, fail, hang or return NaN."""

from __future__ import annotations

import asyncio
import math

from shadow.compare import PositionStats
from shadow.path import ShadowPath
from shadow.queue import ShadowSample, ShadowSequence
from shadow.scoring import ScoredSequence, VocabInfo

LP = {1: math.log(0.6), 2: math.log(0.4)}


class EchoScorer:
    """The reference agrees exactly with the candidate (or flips position `flip_at`). Its
    noise floor, when enabled, is the reference's own distribution (no noise)."""

    name = "echo"
    loaded_as = "a test double"
    integrity_problems: list[str] = []
    vocab = VocabInfo(3, "x")
    cancellable = True  # an abandoned call frees it, as a remote reference's does
    ready = True
    token_caps: tuple[int | None, int | None] = (None, None)
    state: str | None = None

    def __init__(self, flip_at: int | None = None, delay: float = 0.0):
        self.batches: list[int] = []
        self.flip_at = flip_at
        self.delay = delay
        self.noise_dtype: str | None = None

    def enable_noise_floor(self, dtype: str) -> None:
        self.noise_dtype = dtype

    async def score(self, items, top_m, noise_top_k=None, adapter=None):
        self.batches.append(len(items))
        await asyncio.sleep(self.delay)
        out = []
        for item in items:
            positions, noise = [], []
            for i in range(len(item.candidate_ids)):
                dist = {1: 0.1, 2: 0.9} if i == self.flip_at else {1: 0.6, 2: 0.4}
                top = sorted(dist, key=dist.get, reverse=True)
                positions.append(PositionStats({t: math.log(dist[t]) for t in dist}, top, [math.log(dist[t]) for t in top]))
                noise.append({t: math.log(dist[t]) for t in dist})
            out.append(ScoredSequence(positions, noise if noise_top_k is not None else None))
        return out

    async def close(self):
        pass


class RaisingScorer(EchoScorer):
    async def score(self, items, top_m, noise_top_k=None, adapter=None):
        raise RuntimeError("reference exploded")


class HangingScorer(EchoScorer):
    async def score(self, items, top_m, noise_top_k=None, adapter=None):
        await asyncio.sleep(3600)


class NanScorer(EchoScorer):
    async def score(self, items, top_m, noise_top_k=None, adapter=None):
        return [ScoredSequence([PositionStats({1: float("nan"), 2: -1.0}, [2], [-1.0]) for _ in item.candidate_ids])
                for item in items]


async def settle(done) -> None:
    """Wait (10 s at most) until `done()`: the shadow worker got there."""
    for _ in range(2000):
        if done():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the worker did not get there")


def tiny_local_scorer(tokenizer, seed: int):
    """The real LocalScorer on a tiny random Llama sharing the demo model's vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shadow.local_scorer import LocalScorer

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LocalScorer(LlamaForCausalLM(config).eval(), tokenizer, "tiny", torch.device("cpu"))


def sample(n_tokens: int = 4, request_id: str = "r") -> ShadowSample:
    return ShadowSample(request_id, "cand", [ShadowSequence([5, 6, 7], [1] * n_tokens, [dict(LP)] * n_tokens)])


def outcome(path: ShadowPath, name: str) -> float:
    return path.metrics._samples.labels(**path.metrics._base, outcome=name)._value.get()
