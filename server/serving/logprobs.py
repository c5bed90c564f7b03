"""Engine log-probs ({token_id: logprob} per position) to OpenAI's two wire formats.

An engine entry holds the top-k plus the emitted token; clients see exactly the top
`k` they asked for, so extra log-probs requested for other consumers never leak.
"""

from __future__ import annotations

from collections.abc import Callable

from server.protocol import ChatLogprobs, CompletionLogprobs, PromptLogprob, TokenLogprob, TopLogprob

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


def echo_logprobs(
    prompt_ids: list[int], entries: list[dict[int, float]], k: int, token_text: TokenText
) -> CompletionLogprobs:
    """The echoed prompt's part: its first token has no log-prob (null), then one teacher-
    forced entry per position (`entries` covers positions 1..n-1)."""
    out = completion_logprobs(prompt_ids[1:], entries, k, token_text, len(token_text(prompt_ids[0])))
    out.tokens.insert(0, token_text(prompt_ids[0]))
    out.token_logprobs.insert(0, None)
    out.top_logprobs.insert(0, None)
    out.text_offset.insert(0, 0)
    return out


def joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    """`second` after `first`, its text offsets moved past `first`'s text."""
    shift = first.text_offset[-1] + len(first.tokens[-1]) if first.tokens else 0
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + [offset + shift for offset in second.text_offset],
    )


def prompt_logprobs(
    prompt_ids: list[int], entries: list[dict[int, float]], k: int, token_text: TokenText
) -> list[dict[str, PromptLogprob] | None]:
    """vLLM's prompt_logprobs: null, then per position the top-k and the prompt's token."""
    out: list[dict[str, PromptLogprob] | None] = [None]
    for token, entry in zip(prompt_ids[1:], entries):
        top = _top(entry, k)
        ranks = {t: r for r, (t, _) in enumerate(top, 1)}
        shown = dict(top)
        shown[token] = entry[token]
        out.append({str(t): PromptLogprob(logprob=lp, rank=ranks.get(t), decoded_token=token_text(t))
                    for t, lp in shown.items()})
    return out
