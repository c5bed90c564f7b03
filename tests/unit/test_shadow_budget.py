"""The shadow's share of the host: a queue budgeted in tokens, no reference forward past
the batch budget (long sequences truncated, a lone multi-sequence sample split), the
candidate's log-probs packed while queued, a duty cycle and a confined reference thread.
Scoring here is the real LocalScorer on a tiny random Llama; the duty-cycle test uses a
fake clock and sleep."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from server.serving.generation import Choice
from server.serving.shadowing import ShadowTap
from shadow.candidate import CandidateLogprobs
from shadow.local_scorer import LocalScorer
from shadow.metrics import ShadowMetrics
from shadow.path import ShadowPath
from shadow.queue import ShadowSample, ShadowSequence
from shadow.scoring import ScoreItem
from shadow.settings import ShadowSettings
from shadow.throttle import duty_idle_s
from tests.scorers import LP, EchoScorer, settle, tiny_local_scorer


@pytest.fixture(scope="module")
def scorer(tokenizer) -> LocalScorer:
    return tiny_local_scorer(tokenizer, seed=3)


class Recording:
    """The real scorer, recording every batch it is asked to score."""

    def __init__(self, inner):
        self.inner, self.name, self.vocab, self.noise_dtype = inner, inner.name, inner.vocab, None
        self.cancellable = inner.cancellable
        self.ready, self.state = True, None
        self.token_caps: tuple[int | None, int | None] = (None, None)  # a test sets a remote service's
        self.batches: list[list[ScoreItem]] = []

    async def score(self, items, top_m, noise_top_k=None, adapter=None):
        self.batches.append(list(items))
        return await self.inner.score(items, top_m, noise_top_k)

    async def close(self):
        pass


def make(scorer, **overrides) -> ShadowPath:
    settings = ShadowSettings(**{"shadow_rate": 1.0, "shadow_timeout_s": 30.0, "shadow_noise_floor": False, **overrides})
    return ShadowPath(settings, scorer, ShadowMetrics(CollectorRegistry(), "cand", scorer.name), rng=random.Random(0))


def value(path: ShadowPath, name: str, **labels) -> float:
    return path.metrics._registry.get_sample_value(name, {**path.metrics._base, **labels}) or 0.0


def short(request_id: str = "r") -> ShadowSample:  # 3 + 4 = 7 tokens
    return ShadowSample(request_id, "cand", [ShadowSequence([5, 6, 7], [1] * 4, [dict(LP)] * 4)])


def candidate_entries(output: list[int], vocab: int, k: int = 5, seed: int = 0) -> list[dict[int, float]]:
    rng = np.random.default_rng(seed)
    entries = []
    for token in output:
        ids = [*dict.fromkeys([token, *rng.choice(vocab, k, replace=False).tolist()])]
        lp = np.log(rng.dirichlet(np.ones(len(ids))) * 0.9).astype(np.float32)
        entries.append(dict(zip(ids, lp.tolist())))
    return entries


# --- 1. the queue is budgeted in tokens ----------------------------------------------


def test_the_queue_is_budgeted_in_tokens():
    async def scenario():
        path = make(EchoScorer(), shadow_queue_tokens=20, shadow_queue_size=100)
        for i in range(4):  # no worker yet: 7 + 7 fit, a third (21 > 20) does not
            path.submit(short(str(i)))
        assert value(path, "shadow_samples_total", outcome="dropped") == 2
        assert value(path, "shadow_queue_tokens") == 14 and value(path, "shadow_queue_depth") == 2
        path.start()
        await settle(lambda: value(path, "shadow_samples_total", outcome="compared") == 2
                     and value(path, "shadow_queue_tokens") == 0)  # the gauge follows the recording
        assert path._queue.tokens == 0
        path.submit(short("later"))  # room again once the worker took them
        await path.stop()
        return path

    path = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert value(path, "shadow_samples_total", outcome="compared") == 3
    assert value(path, "shadow_samples_total", outcome="dropped") == 2


# --- 2. no reference forward past the batch budget --------------------------------------


def test_a_long_sequence_is_truncated_to_the_budget_and_compares_as_its_prefix(scorer, tokenizer):
    vocab = len(tokenizer)
    prompt, output = list(range(100, 106)), list(range(200, 220))  # 6 + 20 = 26 tokens
    entries = candidate_entries(output, vocab)
    seq = ShadowSequence(prompt, output, entries)

    def scored(budget: int):
        recording = Recording(scorer)
        path = make(recording, shadow_batch_tokens=budget)

        async def go():
            path.start()
            path.submit(ShadowSample("long", "cand", [seq]))
            await path.stop()

        asyncio.run(go())
        return path, recording

    truncated, small = scored(16)
    full, _ = scored(64)
    sizes = [len(i.prompt_ids) + len(i.output_ids) for batch in small.batches for i in batch]
    assert sizes == [16] and all(len(b) * max(sizes) <= 16 for b in small.batches)
    assert value(truncated, "shadow_oversize_sequences_total", action="truncated") == 1
    assert value(truncated, "shadow_samples_total", outcome="compared") == 1
    part, whole = truncated.history.snapshot()[0].candidate, full.history.snapshot()[0].candidate
    assert part.compared_tokens == 10 and whole.compared_tokens == 20
    for name in ("kl", "delta_p", "drift", "emitted_drift"):
        np.testing.assert_allclose(getattr(part.tokens, name), getattr(whole.tokens, name)[:10], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(part.tokens.top1_same, whole.tokens.top1_same[:10])
    expected_first = whole.first_divergence if whole.first_divergence is not None and whole.first_divergence < 10 else None
    assert part.first_divergence == expected_first


def test_a_prompt_filling_the_budget_is_skipped_and_a_lone_wide_sample_is_split(scorer, tokenizer):
    recording = Recording(scorer)
    path = make(recording, shadow_batch_tokens=16)
    out = [300, 301, 302, 303, 304, 305]
    wide = ShadowSample("n2", "cand", [ShadowSequence(list(range(100, 106)), out, candidate_entries(out, len(tokenizer), seed=s))
                                       for s in (1, 2)])  # 2 x 12 = 24 padded > 16
    too_long_prompt = ShadowSample("p", "cand", [ShadowSequence(list(range(100, 116)), [300], candidate_entries([300], 100))])

    async def go():
        path.start()
        path.submit(too_long_prompt)
        path.submit(wide)
        await path.stop()

    asyncio.run(go())
    assert value(path, "shadow_oversize_sequences_total", action="skipped") == 1
    assert value(path, "shadow_samples_total", outcome="skipped") == 1
    assert [len(b) for b in recording.batches] == [1, 1]  # one forward per sequence, each 12 <= 16
    assert value(path, "shadow_samples_total", outcome="compared") == 1
    assert len(path.history.snapshot()) == 2


def test_a_remote_references_own_caps_bound_the_forward(scorer, tokenizer):
    """A reference service publishes its caps (413 past them): a 26-token sequence is cut
    to the service's 16 though the settings' budget (64) would take it whole."""
    recording = Recording(scorer)
    recording.token_caps = (16, 32)
    path = make(recording, shadow_batch_tokens=64)
    out = list(range(200, 220))
    seq = ShadowSequence(list(range(100, 106)), out, candidate_entries(out, len(tokenizer)))

    async def go():
        path.start()
        path.submit(ShadowSample("long", "cand", [seq]))
        await path.stop()

    asyncio.run(go())
    assert [len(i.prompt_ids) + len(i.output_ids) for b in recording.batches for i in b] == [16]
    assert value(path, "shadow_oversize_sequences_total", action="truncated") == 1


def test_an_empty_queue_takes_a_sample_larger_than_its_budget():
    async def scenario():
        path = make(EchoScorer(), shadow_queue_tokens=5)
        path.submit(short("alone"))  # 7 tokens > 5, but nothing is waiting: taken
        path.submit(short("second"))  # now the budget counts: dropped
        assert value(path, "shadow_samples_total", outcome="dropped") == 1
        path.start()
        await path.stop()
        return path

    path = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert value(path, "shadow_samples_total", outcome="compared") == 1


def test_max_tokens_cannot_exceed_the_batch_budget():
    assert ShadowSettings(shadow_batch_tokens=100).shadow_sequence_tokens == 100
    assert ShadowSettings(shadow_batch_tokens=100, shadow_max_tokens=60).shadow_sequence_tokens == 60
    with pytest.raises(ValueError, match="at most"):
        ShadowSettings(shadow_batch_tokens=100, shadow_max_tokens=101)


# --- 3. log-probs held compactly while queued -------------------------------------------


def deep_size(obj, seen=None) -> int:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)  # a numpy array owning its data includes it
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        size += sum(deep_size(v, seen) for v in obj)
    elif isinstance(obj, CandidateLogprobs):
        size += sum(deep_size(getattr(obj, a), seen) for a in obj.__slots__)
    return size


def bytes_per_token(n: int = 256, k: int = 20) -> tuple[float, float]:
    """A served sequence's candidate log-probs (top-20 + the emitted token, ids in
    SmolLM2's 49152 vocabulary, as the tap receives them), before and after packing."""
    rng = np.random.default_rng(0)
    entries = []
    for _ in range(n):
        ids = rng.choice(49152, k + 1, replace=False).tolist()
        entries.append({int(t): float(np.float32(lp)) for t, lp in zip(ids, np.sort(rng.normal(-8, 3, k + 1)))})
    return deep_size(entries) / n, deep_size(CandidateLogprobs.pack(entries)) / n


def test_candidate_logprobs_pack_small_and_unpack_exactly():
    before, after = bytes_per_token()
    print(f"\ncandidate log-probs while queued, top-20 + emitted: {before:.0f} bytes/token as dicts, {after:.0f} packed")
    assert after * 8 < before
    entries = [{5: -0.5, 9: -1.25}, {7: -0.125}, {1: -3.0, 2: -2.0, 3: -1.0}]
    packed = CandidateLogprobs.pack(entries)
    assert packed.to_dicts() == entries and packed.candidate_ids() == [[5, 9], [7], [1, 2, 3]]
    assert packed.head(2).to_dicts() == entries[:2] and len(packed.head(2)) == 2
    assert packed.ids.dtype == np.int32 and packed.logprobs.dtype == np.float32


def test_the_tap_hands_over_packed_logprobs():
    path = make(EchoScorer(), shadow_top_k=1)
    choice = Choice(0, [5, 6], [1, 2], logprobs=[{1: -0.1, 2: -2.5, 3: -3.0}, {1: -0.2, 2: -1.9}], finish_reason="stop")
    ShadowTap(path, "r", "cand").finish([choice])
    seq = asyncio.run(path._queue.next_batch(path._lanes, 10**6))[0].sequences[0]
    assert isinstance(seq.logprobs, CandidateLogprobs)
    assert seq.logprobs.to_dicts() == [{1: np.float32(-0.1).item()}, {1: np.float32(-0.2).item(), 2: np.float32(-1.9).item()}]


# --- 4. the shadow's bounded share of the host --------------------------------------------


def test_duty_cycle_maths():
    assert duty_idle_s(2.0, 0.25) == pytest.approx(6.0)  # busy 2 of every 8 s
    assert duty_idle_s(2.0, 0.5) == pytest.approx(2.0)
    assert duty_idle_s(2.0, 1.0) == 0.0
    busy = 0.3
    assert busy / (busy + duty_idle_s(busy, 0.1)) == pytest.approx(0.1)


def test_the_worker_idles_after_each_batch_and_drops_what_overflows_meanwhile():
    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    clock = Clock()

    class Slow(EchoScorer):  # each batch takes 2 s of the fake clock
        async def score(self, items, top_m, noise_top_k=None, adapter=None):
            clock.now += 2.0
            return await super().score(items, top_m, noise_top_k)

    async def scenario():
        path = make(Slow(), shadow_max_duty=0.25, shadow_batch_tokens=7, shadow_queue_tokens=7)
        pauses, gate = [], asyncio.Event()

        async def sleep(seconds):
            pauses.append(seconds)
            await gate.wait()
            clock.now += seconds

        path._clock, path._sleep = clock, sleep
        path.start()
        path.submit(short("a"))
        await settle(lambda: pauses)
        assert pauses == [pytest.approx(6.0)]  # 2 s busy at duty 0.25: 6 s idle before the next batch
        path.submit(short("b"))  # waits in the queue (7 tokens)
        path.submit(short("c"))  # the queue is full meanwhile: dropped, never waited for
        assert value(path, "shadow_samples_total", outcome="dropped") == 1
        assert path.scorer.batches == [1]  # nothing scored during the pause
        gate.set()
        await settle(lambda: value(path, "shadow_samples_total", outcome="compared") == 2)
        await settle(lambda: len(pauses) == 2)
        await path.stop()
        return path, pauses

    path, pauses = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert pauses == [pytest.approx(6.0)] * 2 and path.scorer.batches == [1, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_reference_thread_is_confined(scorer, tokenizer):
    confined = LocalScorer(scorer._model, tokenizer, "tiny", torch.device("cpu"))
    main_nice, main_threads = os.getpriority(os.PRIO_PROCESS, 0), torch.get_num_threads()
    confined.confine(threads=1, nice=10)
    tid = confined.thread_id
    assert tid != threading.get_native_id()
    assert os.getpriority(os.PRIO_PROCESS, tid) == min(19, main_nice + 10)
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    assert int(stat.rsplit(")", 1)[1].split()[16]) == min(19, main_nice + 10)  # field 19: nice
    assert confined._thread.submit(torch.get_num_threads).result() == 1
    # The rest of the process is untouched: this thread, and threads started later.
    assert os.getpriority(os.PRIO_PROCESS, 0) == main_nice and torch.get_num_threads() == main_threads
    fresh = threading.Thread(target=lambda: setattr(fresh, "n", torch.get_num_threads()))
    fresh.start(), fresh.join()
    assert fresh.n == main_threads
    # It still scores, on that thread.
    item = ScoreItem([1, 520, 9531], [300, 301], [[300, 7], [301]])
    seen = []
    forward = confined._model.forward

    def spy(*args, **kwargs):
        seen.append(threading.get_native_id())
        return forward(*args, **kwargs)

    confined._model.forward = spy
    try:
        out = asyncio.run(confined.score([item], top_m=2))
    finally:
        del confined._model.forward
    assert len(out[0].reference) == 2 and seen == [tid]
    confined._thread.shutdown()
