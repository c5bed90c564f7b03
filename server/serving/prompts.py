"""Prompt rendering with the served model's tokenizer: text in, the token ids every
consumer (engine, and later the shadow) shares. Text is never re-tokenized downstream."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from server.errors import InvalidRequestError
from server.protocol import ChatMessage


class PromptRenderer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.token_text = lru_cache(maxsize=65536)(self._token_text)

    @classmethod
    def load(cls, model_dir: Path, trust_remote_code: bool = False) -> PromptRenderer:
        from transformers import AutoTokenizer

        from shadow.remote_code import remote_code_allowed, remote_code_explained

        trust = remote_code_allowed(model_dir, trust_remote_code)
        with remote_code_explained(model_dir, trust):
            return cls(AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust))

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        if not self.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template; use /v1/completions")
        conversation = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages
        ]
        try:
            encoded = self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
            )
        except Exception as exc:  # template-raised errors (e.g. role order) are the client's
            raise InvalidRequestError(f"cannot render the chat template: {exc}", param="messages") from exc
        return list(encoded["input_ids"])

    def text(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def check_ids(self, ids: list[int], param: str = "prompt") -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", param=param
            )
        return ids

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])
