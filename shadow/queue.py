"""The shadow's samples and the bounded queue they wait in for the reference.

A sample is one finished request's sequences (prompt, output, the candidate's packed
log-probs) on one lane (the base, or a mounted adapter's mount). The queue is bounded
twice, in samples and in prompt + output tokens; a sample that does not fit is refused
(the caller counts it dropped), never waited for. Batches are taken in arrival order,
one lane's samples at a time, while their padded size fits the reference's budget; the
sample that ends a batch is carried over to open the next. Each lane's share of what
waits (its gauges, its oldest sample's age) is kept on the lane (shadow/lanes.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from shadow.candidate import CandidateLogprobs
from shadow.lanes import BASE, Lane, Lanes
from shadow.scoring import MAX_BATCH_SEQUENCES


@dataclass(frozen=True)
class ShadowSequence:
    prompt_ids: list[int]
    output_ids: list[int]
    # The candidate's raw top-k (+ emitted token) per position; given as {id: logprob}
    # dicts or already packed, held packed (shadow/candidate.py) while queued.
    logprobs: CandidateLogprobs

    def __post_init__(self):
        if not isinstance(self.logprobs, CandidateLogprobs):
            object.__setattr__(self, "logprobs", CandidateLogprobs.pack(self.logprobs))

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def head(self, tokens: int) -> ShadowSequence:
        """The first `tokens` tokens of prompt + output (at least one output token must fit)."""
        keep = tokens - len(self.prompt_ids)
        return ShadowSequence(self.prompt_ids, self.output_ids[:keep], self.logprobs.head(keep))


@dataclass(frozen=True)
class ShadowSample:
    request_id: str
    model: str
    sequences: list[ShadowSequence]
    finished_at: float = field(default_factory=time.monotonic)  # its request's end (the age's origin)
    adapter: str = BASE  # the mounted LoRA adapter its request named ("" the base)
    adapter_id: int = 0  # that mount's id: a sample of an earlier mount under the same name is not judged

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.sequences)


class SampleQueue:
    def __init__(self, max_samples: int, max_tokens: int):
        self._queue: asyncio.Queue[ShadowSample] = asyncio.Queue(max_samples)
        self._max_tokens = max_tokens
        self._carry: ShadowSample | None = None  # taken from the queue, opening the next batch
        self.tokens = 0  # prompt + output tokens of the queued samples and the carry

    def qsize(self) -> int:
        return self._queue.qsize() + (self._carry is not None)

    def put(self, sample: ShadowSample, lane: Lane) -> bool:
        """Queue it, or refuse it (False) when the queue is full. An empty queue takes any
        sample (it was fitted to the batch budget already), so a large batch of prompts is
        never refused for a budget it alone exceeds."""
        if self.tokens and self.tokens + sample.tokens > self._max_tokens:
            return False
        try:
            self._queue.put_nowait(sample)
        except asyncio.QueueFull:
            return False
        self.tokens += sample.tokens
        lane.queued(sample.finished_at, sample.tokens)
        return True

    async def next_batch(self, lanes: Lanes, batch_tokens: int) -> list[ShadowSample]:
        """Wait for one sample, then take whatever else is queued on the same lane while
        the batch's padded size (sequences x longest sequence: what the reference's
        logits cost) fits `batch_tokens`. Call `done` with the batch when it is finished."""
        first, self._carry = self._carry or await self._queue.get(), None
        batch = [first]
        while not self._queue.empty():
            nxt = self._queue.get_nowait()
            if nxt.adapter != first.adapter or _padded_tokens([*batch, nxt]) > batch_tokens or \
                    sum(len(s.sequences) for s in (*batch, nxt)) > MAX_BATCH_SEQUENCES:
                self._carry = nxt
                break
            batch.append(nxt)
        lane = lanes.find(first.adapter)
        for sample in batch:
            self.tokens -= sample.tokens
            lane.taken(sample.tokens)
        return batch

    def done(self, batch: list[ShadowSample]) -> None:
        for _ in batch:
            self._queue.task_done()

    async def join(self) -> None:
        """Until every sample put has been taken and finished (or purged)."""
        await self._queue.join()

    def purge(self, drop: Callable[[ShadowSample], bool]) -> int:
        """Take the waiting samples (the carry too) that `drop` selects out, the rest kept
        in order; returns how many were taken out (their lanes' bookkeeping is the caller's)."""
        return len(self._remove(drop))

    def take(self, drop: Callable[[ShadowSample], bool], lanes: Lanes) -> list[ShadowSample]:
        """The waiting samples `drop` selects, out of the queue and off their lanes' books."""
        removed = self._remove(drop)
        for sample in removed:
            if (lane := lanes.find(sample.adapter)) is not None and lane.waiting:
                lane.taken(sample.tokens)
        return removed

    def _remove(self, drop: Callable[[ShadowSample], bool]) -> list[ShadowSample]:
        removed = []
        if self._carry is not None and drop(self._carry):  # taken by get() and not yet finished: released here
            removed.append(self._carry)
            self.tokens -= self._carry.tokens
            self._carry = None
            self._queue.task_done()
        # A kept carry stays the carry: the queue may be full without it (it holds max_samples + 1).
        waiting = []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
            self._queue.task_done()
        for sample in waiting:
            if drop(sample):
                removed.append(sample)
                self.tokens -= sample.tokens
            else:
                self._queue.put_nowait(sample)
        return removed

    def drop_everything(self, lanes: Iterable[Lane], outcome: str) -> int:
        """Every waiting sample out, counted as `outcome` on its lane (shutdown, refusal)."""
        left = self.purge(lambda sample: True)
        for lane in lanes:
            if lane.waiting:
                lane.metrics.sample(outcome, len(lane.waiting))
            lane.cleared()
        self.tokens = 0
        return left


def _padded_tokens(batch: list[ShadowSample]) -> int:
    lengths = [s.tokens for sample in batch for s in sample.sequences]
    return len(lengths) * max(lengths)
