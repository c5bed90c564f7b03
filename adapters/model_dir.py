"""A Hugging Face model directory: the one check that a path is one (it holds a
config.json) and the one reader of its config.json. A leaf (it imports only
adapters.errors), so server, shadow and every adapter use it without breaking the layering."""

from __future__ import annotations

import json
from pathlib import Path

from adapters.errors import AdapterError

CONFIG = "config.json"
# The words every loader and settings validator refuses a path with; `diagnose` has its own.
NOT_A_MODEL_DIR = "{path} is not a Hugging Face model directory (no config.json)"


class ConfigError(AdapterError):
    """A model's config.json is missing, or is not a JSON object."""


class NotAModelDirError(ConfigError):
    """The path holds no config.json: not a Hugging Face model directory."""


def is_model_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def check_model_dir(path: Path, error: type[Exception] = NotAModelDirError, message: str = NOT_A_MODEL_DIR) -> Path:
    """`path` when it holds a config.json, else raises `error(message)` (`{path}` filled
    in): a caller keeps its own exception type and words."""
    if not is_model_dir(path):
        raise error(message.format(path=path))
    return path


def read_config(path: Path, *, allow_file: bool = False, message: str = NOT_A_MODEL_DIR) -> dict:
    """The config.json of the model directory `path`, as a dict. With `allow_file`, a `path`
    that is not a directory is read as the config file itself (`inspect`, `plan`; a missing
    one raises FileNotFoundError). Raises NotAModelDirError (`message`) when the directory
    has no config.json, ConfigError when the file is not a JSON object."""
    path = Path(path)
    if allow_file and not path.is_dir():
        file = path
    else:
        file = check_model_dir(path, message=message) / CONFIG
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: not a JSON object (a {type(config).__name__})")
    return config


def exact_attention(path: Path) -> dict[str, str]:
    """from_pretrained's keyword for an exact forward of the model at `path`: eager attention
    where its config soft-caps the attention logits (Gemma-2's `attn_logit_softcapping`).
    transformers' default (sdpa) and its flash kernels drop the soft-cap without a word, so a
    Gemma-2 reference would not be the model vLLM serves. {} otherwise (the default stays)."""
    try:
        config = read_config(path)
    except ConfigError:
        return {}  # the loader says what is wrong with it
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return {"attn_implementation": "eager"} if text.get("attn_logit_softcapping") else {}
