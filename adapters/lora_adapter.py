"""A PEFT LoRA adapter directory, read and checked against the base it is mounted on
before any engine sees it: its rank (and per-module ranks), scale and target modules
from adapter_config.json, and every lora_A / lora_B shape against the base weight it
adds to, read from the safetensors headers (no tensor is loaded).

An adapter trained for another base (another width, depth or projection size) is
refused with the first tensor that does not fit, instead of failing inside vLLM's
worker or, worse, loading into a model of the same shape it was not trained for (that
case cannot be seen from shapes; `base_model_name_or_path` is reported, not trusted).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import AdapterError
from adapters.tensor_io import TensorSource, open_checkpoint

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."


class LoraAdapterError(AdapterError):
    """An adapter directory that cannot be mounted on this base."""


class AdapterNotFoundError(LoraAdapterError):
    """No adapter at that path (no directory, or no adapter_config.json in it)."""


@dataclass(frozen=True)
class LoraAdapterInfo:
    path: Path
    rank: int  # the largest rank of any module (rank_pattern included): what vLLM's max_lora_rank must hold
    alpha: float
    base_model: str | None  # adapter_config.json's base_model_name_or_path, as written at training


def read_lora_adapter(path: Path) -> LoraAdapterInfo:
    """adapter_config.json and the weights' names and shapes (no tensor read)."""
    if not path.is_dir() or not (path / CONFIG).is_file():
        raise AdapterNotFoundError(f"{path}: no LoRA adapter there (a PEFT adapter directory holds {CONFIG})")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraAdapterError(f"{path / CONFIG}: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise LoraAdapterError(f"{path / CONFIG}: expected a JSON object, found {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraAdapterError(f"{path}: a {config.get('peft_type')} adapter; only LoRA adapters can be mounted")
    if config.get("use_dora"):
        raise LoraAdapterError(f"{path}: a DoRA adapter; vLLM serves plain LoRA only (merge it with merge-lora instead)")
    if config.get("modules_to_save"):
        raise LoraAdapterError(f"{path}: the adapter also saves whole modules ({', '.join(config['modules_to_save'])}); "
                               "vLLM cannot mount those: merge it (shadowserve merge-lora) and serve the result")
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r", 8), *(pattern.values() if isinstance(pattern, dict) else [pattern])]
    alpha = config.get("lora_alpha", 8)
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks) or \
            not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise LoraAdapterError(f"{path / CONFIG}: r and rank_pattern must be positive integers and lora_alpha a "
                               f"number (r={config.get('r')!r}, lora_alpha={alpha!r})")
    weights = adapter_weights(path)
    if not any(".lora_A." in n or ".lora_B." in n for n in weights.keys()):
        raise LoraAdapterError(f"{weights.path}: no lora_A / lora_B tensors")
    return LoraAdapterInfo(path, max(ranks), float(alpha),
                           config.get("base_model_name_or_path"))


def check_lora_adapter(path: Path, base_dir: Path) -> LoraAdapterInfo:
    """The adapter's every lora_A [r, in] and lora_B [out, r] against the base weight
    [out, in] it updates; refuses a module the base does not have or a shape it does not take."""
    info = read_lora_adapter(path)
    weights = adapter_weights(path)
    try:
        base = open_checkpoint(base_dir)
    except Exception as exc:  # no weights, or a file its reader refuses
        raise LoraAdapterError(f"the base {base_dir}: {exc}") from exc
    for name in weights.keys():
        kind = "A" if ".lora_A." in name else "B" if ".lora_B." in name else None
        if kind is None:
            continue
        module = name.removeprefix(PREFIX).split(f".lora_{kind}.")[0]
        target = f"{module}.weight"
        if target not in base:
            raise LoraAdapterError(
                f"{path}: the adapter updates {module}, which the base {base_dir} does not have: it was trained for "
                f"another base ({info.base_model or 'base_model_name_or_path not recorded'})")
        out_dim, in_dim = (*base[target].shape(target), 0, 0)[:2]
        shape = (*weights.shape(name), 0, 0)[:2]
        rank = shape[0] if kind == "A" else shape[1]
        wanted = (rank, in_dim) if kind == "A" else (out_dim, rank)
        if tuple(shape[:2]) != wanted:
            raise LoraAdapterError(
                f"{path}: {name} is {list(shape)}, but the base's {target} is {[out_dim, in_dim]} (lora_{kind} must be "
                f"{list(wanted)}): the adapter was trained for another base "
                f"({info.base_model or 'base_model_name_or_path not recorded'})")
    return info


def adapter_weights(path: Path) -> TensorSource:
    for name in WEIGHTS:
        if (path / name).is_file():
            try:
                return TensorSource(path / name)
            except AdapterError:
                raise
            except Exception as exc:  # a truncated or corrupt safetensors header
                raise LoraAdapterError(f"{path / name}: not readable ({exc})") from exc
    raise LoraAdapterError(f"{path}: no adapter weights ({' or '.join(WEIGHTS)})")
