"""Engine log-probs ({token_id: logprob} per position) to OpenAI's two wire formats.

An engine entry holds the top-k plus the emitted token; clients see exactly the top
`k` they asked for, so extra log-probs requested for other consumers never leak.
"""

from __future__ import annotations

from collections.abc import Callable

from server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

TokenText = Callable[[int], str]


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: item[1], reverse=True)[:k]


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(
    token_ids: list[int], entries: list[dict[int, float]], k: int, token_text: TokenText
) -> ChatLogprobs:
    content = []
    for token, entry in zip(token_ids, entries):
        text = token_text(token)
        content.append(
            TokenLogprob(
                token=text,
                logprob=entry[token],
                bytes=_bytes(text),
                top_logprobs=[
                    TopLogprob(token=token_text(t), logprob=lp, bytes=_bytes(token_text(t)))
                    for t, lp in _top(entry, k)
                ],
            )
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    token_ids: list[int], entries: list[dict[int, float]], k: int, token_text: TokenText, offset: int = 0
) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token, entry in zip(token_ids, entries):
        text = token_text(token)
        out.tokens.append(text)
        out.token_logprobs.append(entry[token])
        out.top_logprobs.append({token_text(t): lp for t, lp in _top(entry, k)})
        out.text_offset.append(offset)
        offset += len(text)
    return out
