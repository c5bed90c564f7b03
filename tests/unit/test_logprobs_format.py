"""Engine log-prob entries to OpenAI's formats: exactly the top k the client asked for."""

from __future__ import annotations

import pytest

from server.serving.logprobs import chat_logprobs, completion_logprobs

TEXT = {1: "a", 2: "b", 3: "c", 4: "dd"}.__getitem__
# Emitted token 4 is not among the top 3; the engine adds it to the entry anyway.
ENTRIES = [{1: -0.1, 2: -2.0, 3: -3.0, 4: -9.0}, {2: -0.5, 1: -1.0, 3: -4.0}]


def test_chat_keeps_top_k_sorted_and_the_emitted_tokens_logprob():
    out = chat_logprobs([4, 2], ENTRIES, 2, TEXT)
    first, second = out.content
    assert (first.token, first.logprob, first.bytes) == ("dd", -9.0, [100, 100])
    assert [(a.token, a.logprob) for a in first.top_logprobs] == [("a", -0.1), ("b", -2.0)]
    assert [a.token for a in second.top_logprobs] == ["b", "a"]


def test_k_zero_gives_the_emitted_token_only():
    out = chat_logprobs([4], ENTRIES[:1], 0, TEXT)
    assert out.content[0].top_logprobs == [] and out.content[0].logprob == -9.0


def test_completion_format_with_offsets():
    out = completion_logprobs([4, 2], ENTRIES, 1, TEXT, offset=10)
    assert out.tokens == ["dd", "b"]
    assert out.token_logprobs == [-9.0, -0.5]
    assert out.top_logprobs == [{"a": -0.1}, {"b": -0.5}]
    assert out.text_offset == [10, 12]


@pytest.mark.parametrize("k", [1, 3])
def test_never_more_than_k(k):
    out = chat_logprobs([1], ENTRIES[:1], k, TEXT)
    assert len(out.content[0].top_logprobs) == k
