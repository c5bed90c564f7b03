"""shadow/queue.py: the samples (packed while queued) and the bounded queue they wait in:
bounded in samples and in tokens (refused, never waited for), batched in arrival order
one lane at a time within the reference's padded budget, the sample that ends a batch
carried over to open the next, and each lane's books (its gauges) kept as samples come
and go. Real lanes and metrics on a private registry; no worker, no scorer."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from shadow.candidate import CandidateLogprobs
from shadow.lanes import BASE, Lanes
from shadow.metrics import ShadowMetrics
from shadow.queue import SampleQueue, ShadowSample, ShadowSequence
from shadow.scoring import MAX_BATCH_SEQUENCES

LOGPROBS = [{5: -0.25, 6: -1.5}, {7: -0.5}, {8: -2.0, 9: -3.0}]


def sequence(prompt: int = 3, output: int = 2) -> ShadowSequence:
    return ShadowSequence(list(range(prompt)), [7] * output, [{7: -0.5}] * output)


def sample(request_id: str, tokens: int = 5, adapter: str = BASE, sequences: int = 1) -> ShadowSample:
    """A sample of `sequences` sequences of `tokens` tokens each (3 of prompt)."""
    return ShadowSample(request_id, "cand", [sequence(3, tokens - 3) for _ in range(sequences)], adapter=adapter)


class Books:
    """Lanes (the base and adapter "a") on a private registry, with their gauges read back."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.lanes = Lanes(ShadowMetrics(self.registry, "cand", "echo"), max_sequences=100)
        self.lanes.add("a", adapter_id=1)

    def lane(self, adapter: str = BASE):
        return self.lanes.find(adapter)

    def gauges(self, adapter: str = BASE) -> tuple[float | None, float | None]:
        labels = {"model": "cand", "reference": "echo", "adapter": adapter}
        return (self.registry.get_sample_value("shadow_queue_depth", labels),
                self.registry.get_sample_value("shadow_queue_tokens", labels))

    def outcome(self, name: str, adapter: str = BASE) -> float | None:
        labels = {"model": "cand", "reference": "echo", "adapter": adapter, "outcome": name}
        return self.registry.get_sample_value("shadow_samples_total", labels)


async def next_batch(queue: SampleQueue, books: Books, batch_tokens: int = 10**6) -> list[ShadowSample]:
    """The next batch; a queue that has none to give fails the test instead of hanging it."""
    return await asyncio.wait_for(queue.next_batch(books.lanes, batch_tokens), 1)


def ids(batch: list[ShadowSample]) -> list[str]:
    return [s.request_id for s in batch]


# --- the samples ---------------------------------------------------------------------


def test_a_sequence_holds_its_logprobs_packed_and_counts_its_tokens():
    seq = ShadowSequence([1, 2], [5, 7, 8], LOGPROBS)
    assert isinstance(seq.logprobs, CandidateLogprobs) and seq.logprobs.to_dicts() == LOGPROBS
    assert seq.logprobs.ids.dtype == np.int32 and seq.tokens == 5
    packed = CandidateLogprobs.pack(LOGPROBS)
    assert ShadowSequence([1], [5, 7, 8], packed).logprobs is packed  # packed already: kept as is


def test_a_sequence_head_keeps_the_prompt_and_the_first_outputs():
    head = ShadowSequence([1, 2], [5, 7, 8], LOGPROBS).head(4)
    assert (head.prompt_ids, head.output_ids, head.tokens) == ([1, 2], [5, 7], 4)
    assert head.logprobs.to_dicts() == LOGPROBS[:2]


def test_a_sample_counts_the_tokens_of_all_its_sequences_and_is_stamped_when_made():
    before = time.monotonic()
    s = ShadowSample("r", "cand", [sequence(3, 2), sequence(4, 1)])
    assert s.tokens == 10 and s.adapter == BASE and s.adapter_id == 0
    assert before <= s.finished_at <= time.monotonic()


# --- bounded: refused when full, never waited for --------------------------------------


def test_the_queue_refuses_past_its_sample_count():
    books, queue = Books(), SampleQueue(max_samples=2, max_tokens=10**6)
    assert [queue.put(sample(str(i)), books.lane()) for i in range(3)] == [True, True, False]
    assert queue.qsize() == 2 and queue.tokens == 10
    assert books.gauges() == (2, 10) and len(books.lane().waiting) == 2


def test_the_queue_refuses_past_its_token_budget_but_an_empty_one_takes_any_sample():
    books, queue = Books(), SampleQueue(max_samples=10, max_tokens=12)
    assert queue.put(sample("big", tokens=40), books.lane())  # alone over budget: taken, an empty queue refuses nothing
    assert not queue.put(sample("small", tokens=4), books.lane())
    asyncio.run(next_batch(queue, books))
    assert queue.tokens == 0 and books.gauges() == (0, 0)
    assert [queue.put(sample(n, tokens=6), books.lane()) for n in "abc"] == [True, True, False]  # 6 + 6 fits 12, 18 not
    assert queue.tokens == 12


# --- batches --------------------------------------------------------------------------


def test_batches_take_what_fits_the_padded_budget_and_carry_the_next():
    books, queue = Books(), SampleQueue(max_samples=10, max_tokens=10**6)
    for name, tokens in (("a", 5), ("b", 5), ("c", 8), ("d", 5)):
        queue.put(sample(name, tokens), books.lane())

    async def two_batches():
        first = await next_batch(queue, books, 16)
        size_between = queue.qsize()
        second = await next_batch(queue, books, 16)
        queue.done(first)
        queue.done(second)
        await asyncio.wait_for(queue.join(), 1)  # every sample taken and done
        return ids(first), size_between, ids(second)

    # a + b: 2 x 5 = 10 fits 16; with c it would be 3 x 8 = 24: c is carried (still counted
    # as waiting) and opens the next batch; c + d: 2 x 8 = 16 fits.
    assert asyncio.run(two_batches()) == (["a", "b"], 2, ["c", "d"])
    assert queue.tokens == 0 and queue.qsize() == 0 and books.gauges() == (0, 0)


def test_a_batch_holds_one_lanes_samples():
    books, queue = Books(), SampleQueue(max_samples=10, max_tokens=10**6)
    queue.put(sample("base-1"), books.lane())
    queue.put(sample("a-1", adapter="a"), books.lane("a"))
    queue.put(sample("base-2"), books.lane())
    assert books.gauges() == (2, 10) and books.gauges("a") == (1, 5)

    async def all_batches():
        return [ids(await next_batch(queue, books)) for _ in range(3)]

    assert asyncio.run(all_batches()) == [["base-1"], ["a-1"], ["base-2"]]  # arrival order, not regrouped
    assert books.gauges() == (0, 0) and books.gauges("a") == (0, 0)


def test_a_batch_holds_at_most_the_references_sequence_count():
    books, queue = Books(), SampleQueue(max_samples=10, max_tokens=10**7)
    half = MAX_BATCH_SEQUENCES // 2
    for name in "abc":
        queue.put(sample(name, tokens=4, sequences=half), books.lane())

    async def batches():
        return [ids(await next_batch(queue, books, 10**7)) for _ in range(2)]

    assert asyncio.run(batches()) == [["a", "b"], ["c"]]


def test_next_batch_waits_for_a_sample():
    books, queue = Books(), SampleQueue(max_samples=10, max_tokens=10**6)

    async def scenario():
        waiting = asyncio.create_task(queue.next_batch(books.lanes, 10**6))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        queue.put(sample("late"), books.lane())
        return ids(await asyncio.wait_for(waiting, 1))

    assert asyncio.run(scenario()) == ["late"]


# --- taking samples out -----------------------------------------------------------------


def test_purge_takes_the_selected_samples_the_carry_included_and_keeps_the_rest_in_order():
    books, queue = Books(), SampleQueue(max_samples=10, max_tokens=10**6)
    for name, tokens in (("a", 5), ("b", 9), ("c", 5), ("d", 5), ("e", 5)):
        queue.put(sample(name, tokens), books.lane())

    async def scenario():
        first = await next_batch(queue, books, 10)  # "a"; "b" (9) is the carry
        queue.done(first)
        removed = queue.purge(lambda s: s.request_id in ("b", "d"))
        rest = await next_batch(queue, books)
        queue.done(rest)
        await asyncio.wait_for(queue.join(), 1)  # the purged carry was released too
        return ids(first), removed, ids(rest)

    first, removed, rest = asyncio.run(scenario())
    assert (first, removed, rest) == (["a"], 2, ["c", "e"])
    assert queue.tokens == 0


def test_take_returns_the_selected_samples_off_their_lanes_books():
    books, queue = Books(), SampleQueue(max_samples=10, max_tokens=10**6)
    queue.put(sample("base-1"), books.lane())
    queue.put(sample("a-1", adapter="a"), books.lane("a"))
    queue.put(sample("a-2", tokens=7, adapter="a"), books.lane("a"))
    taken = queue.take(lambda s: s.adapter == "a", books.lanes)
    assert ids(taken) == ["a-1", "a-2"] and queue.qsize() == 1 and queue.tokens == 5
    assert books.gauges("a") == (0, 0) and books.gauges() == (1, 5)


def test_drop_everything_counts_each_lanes_waiting_samples_as_the_outcome():
    books, queue = Books(), SampleQueue(max_samples=10, max_tokens=10**6)
    queue.put(sample("base-1"), books.lane())
    queue.put(sample("a-1", adapter="a"), books.lane("a"))
    queue.put(sample("a-2", adapter="a"), books.lane("a"))
    assert queue.drop_everything(books.lanes, "dropped") == 3
    assert (books.outcome("dropped"), books.outcome("dropped", "a")) == (1, 2)
    assert queue.qsize() == 0 and queue.tokens == 0
    assert books.gauges() == (0, 0) and books.gauges("a") == (0, 0)
    assert asyncio.run(asyncio.wait_for(queue.join(), 1)) is None  # nothing left unfinished


@pytest.mark.parametrize("max_samples", [1, 3])
def test_a_full_queue_takes_samples_again_once_one_is_taken(max_samples):
    books, queue = Books(), SampleQueue(max_samples=max_samples, max_tokens=10**6)
    for i in range(max_samples):
        assert queue.put(sample(str(i)), books.lane())
    assert not queue.put(sample("over"), books.lane())
    asyncio.run(next_batch(queue, books, 5))  # one sample's padded size: one taken
    assert queue.put(sample("again"), books.lane())
