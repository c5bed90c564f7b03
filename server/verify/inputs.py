"""What `verify` feeds the candidate: chat prompts (a built-in set, or a file), or a
corpus cut into windows for llama.cpp's teacher-forced mode."""

from __future__ import annotations

import json
from pathlib import Path

# 32 everyday chat requests of different kinds (explanation, lists, code, arithmetic,
# poetry, advice, one-word answers), so a verdict is not about one style of text.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "Who are you?",
    "Describe the city of Paris.",
    "Write a haiku about the sea.",
    "Explain what a CPU does.",
    "Give me tips for learning to cook.",
    "Why is the sky blue?",
    "Tell me about the history of Rome.",
    "How do plants make food?",
    "What is a black hole?",
    "Write a short poem about winter.",
    "Explain how vaccines work.",
    "What are the benefits of exercise?",
    "Write a Python function that reverses a string.",
    "How does the internet work?",
    "What is machine learning?",
    "Tell me a story about a dragon.",
    "Why do we need sleep?",
    "Explain the water cycle.",
    "What makes a good friend?",
    "How do airplanes fly?",
    "List five fruits that are red.",
    "What is 17 times 23? Show your steps.",
    "Translate 'good morning, how are you?' into French.",
    "Summarise the plot of Romeo and Juliet in three sentences.",
    "What should I pack for a weekend hiking trip?",
    "Explain recursion to a ten-year-old.",
    "Write an email asking my manager for a day off.",
    "What is the difference between weather and climate?",
    "Give me three ideas for a birthday party.",
    "How do I make a cup of tea?",
    "What are prime numbers?",
    "Describe the colour blue to someone who cannot see.",
)


class InputError(ValueError):
    """A prompts or corpus file that cannot be used."""


def load_prompts(path: Path | None, samples: int | None) -> list[list[dict]]:
    """Conversations (lists of chat messages). A file holds one per line: a JSON list of
    messages, a JSON object with "messages", or a plain line (one user message)."""
    if path is None:
        lines: list = list(BUILTIN_PROMPTS)
    else:
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read prompts from {path}: {exc}") from exc
    conversations = [_conversation(line, n + 1, path) for n, line in enumerate(lines)]
    if samples is not None:
        conversations = conversations[:samples]
    if not conversations:
        raise InputError(f"no prompts in {path}")
    return conversations


def _conversation(line: str, number: int, path: Path | None) -> list[dict]:
    stripped = line.strip()
    if not stripped.startswith(("[", "{")):
        return [{"role": "user", "content": stripped}]
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{number}: not valid JSON ({exc.msg}); write a JSON list of messages or plain text") from exc
    messages = value.get("messages") if isinstance(value, dict) else value
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages)):
        raise InputError(f"{path}:{number}: expected a list of chat messages with 'role' and 'content'")
    return messages


def corpus_windows(token_ids: list[int], context: int, samples: int | None) -> list[tuple[list[int], list[int]]]:
    """llama.cpp's perplexity split: consecutive windows of `context` tokens; the first
    half of each is context only, the second half is scored (every scored token sees at
    least context/2 tokens before it). Returns (context part, scored part) pairs."""
    if context < 4:
        raise InputError("--context must be at least 4 tokens")
    windows = [token_ids[i : i + context] for i in range(0, len(token_ids) - context + 1, context)]
    if samples is not None:
        windows = windows[:samples]
    if not windows:
        raise InputError(f"the corpus has {len(token_ids)} tokens: fewer than one window of --context {context}")
    half = context // 2
    return [(w[:half], w[half:]) for w in windows]
