"""A checkpoint's vocabulary without its remote code: what the reference's vocabulary
check needs (ids and their tokens, the padding id), read from `tokenizer.json` with the
tokenizers library or from a sentencepiece `tokenizer.model` (InternLM2's released
tokenizer is a sentencepiece model behind a remote-code class)."""

from __future__ import annotations

import json
from pathlib import Path

from adapters.errors import AdapterError


class NativeVocab:
    """Quacks like a tokenizer where the vocabulary check reads one: `get_vocab()`,
    `len()`, `pad_token_id`."""

    def __init__(self, vocab: dict[str, int], pad_token_id: int | None, encoder, bos_token_id: int | None = None):
        self._vocab = vocab
        self.pad_token_id = pad_token_id
        self._encoder = encoder  # sentencepiece's processor
        self._bos = bos_token_id

    def encode(self, text: str) -> list[int]:
        """Sentencepiece's pieces, after BOS when the tokenizer config adds one (for
        diagnose's prompts; the shadow never tokenizes on the reference side)."""
        return ([self._bos] if self._bos is not None else []) + self._encoder.encode(text)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def __len__(self) -> int:
        return len(self._vocab)


def load_vocab(model_dir: Path):
    """`tokenizer.json` first (through transformers' generic fast tokenizer, so the ids are
    exactly what the candidate's tokenizer gives for the same file), else `tokenizer.model`."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if (model_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                       pad_token=_token(config.get("pad_token")))
    if (model_dir / "tokenizer.model").is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        for index, token in (config.get("added_tokens_decoder") or {}).items():
            vocab.setdefault(_token(token), int(index))
        pad = _token(config.get("pad_token"))
        bos = sp.bos_id() if config.get("add_bos_token", True) and sp.bos_id() >= 0 else None
        return NativeVocab(vocab, vocab.get(pad) if pad else (sp.pad_id() if sp.pad_id() >= 0 else None),
                           sp, bos)
    raise AdapterError(f"{model_dir}: no tokenizer.json or tokenizer.model to read the vocabulary from")


def _token(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value
