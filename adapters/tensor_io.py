"""Streaming tensor I/O for the checkpoint tools.

Reading: safetensors files via `safe_open` (memory-mapped, one tensor at a time) and
PyTorch `.pt` shards via `torch.load(mmap=True)`. Writing: `write_safetensors` takes a
*plan* — name, dtype, shape and a function that produces the tensor — so each shard's
header is written before any data and tensors are made and written one at a time:
peak memory stays near the largest single tensor, whatever the checkpoint's size.
The output is standard safetensors (read back by the safetensors library in tests).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.errors import AdapterError

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """Names, shapes and lazily loaded tensors of one checkpoint file."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            self._st = safe_open(path, framework="pt")
            self._pt = None
        else:
            self._st = None
            try:
                self._pt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # not a torch zip file, or pickled objects other than tensors
                raise AdapterError(f"{path}: cannot read it as a state dict of tensors ({exc})") from exc
            if not isinstance(self._pt, dict) or not all(isinstance(v, torch.Tensor) for v in self._pt.values()):
                raise AdapterError(f"{path}: expected a state dict of tensors, found {type(self._pt).__name__}")

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._pt)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(name).get_shape())
        return tuple(self._pt[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if self._st is not None:
            return _NAME_TO_DTYPE[self._st.get_slice(name).get_dtype()]
        return self._pt[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._st.get_tensor(name) if self._st is not None else self._pt[name]


_NAME_TO_DTYPE = {v: k for k, v in _DTYPES.items()}


def checkpoint_files(model_dir: Path) -> list[Path]:
    """safetensors files, else PyTorch `.bin` files (read memory-mapped, weights only)."""
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors or *.bin weight files")
    return files


def open_checkpoint(model_dir: Path) -> dict[str, TensorSource]:
    """Every tensor name of a (possibly sharded) checkpoint -> its file."""
    sources = {}
    for path in checkpoint_files(model_dir):
        source = TensorSource(path)
        for name in source.keys():
            sources[name] = source
    return sources


def write_safetensors(plan: list[PlannedTensor], out_dir: Path, max_shard_bytes: int = 4 * 2**30,
                      progress: str | None = None) -> list[Path]:
    """Write the plan as `model.safetensors`, or as shards with an HF index when larger
    than `max_shard_bytes`; with `progress`, a tqdm bar (bytes) under that name. Returns
    the files written."""
    from tqdm import tqdm

    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written = []
    with tqdm(total=sum(item.nbytes for item in plan), desc=progress, unit="B", unit_scale=True,
              disable=progress is None, leave=False) as bar:
        for name, shard in zip(names, shards):
            written.append(_write_shard(shard, out_dir / name, bar.update))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(item.nbytes for item in plan)},
            "weight_map": {item.name: name for name, shard in zip(names, shards) for item in shard},
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return written


def _write_shard(shard: list[PlannedTensor], path: Path, advance=lambda nbytes: None) -> Path:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in shard:
        header[item.name] = {"dtype": _DTYPES[item.dtype], "shape": list(item.shape),
                             "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for item in shard:
            tensor = item.produce()
            if tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:
                raise ValueError(f"{item.name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {item.shape} {item.dtype}")
            f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))  # no copy
            del tensor
            advance(item.nbytes)
    return path


def sha256_file(path: Path, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_provenance(out_dir: Path, *, tool: str, source: str, rules: list[str], dtype: str, extra: dict | None = None) -> Path:
    """Beside every output: where it came from, what was done, and checksums of the result."""
    import time

    files = sorted(p for p in out_dir.iterdir() if p.is_file() and p.name != "provenance.json")
    record = {
        "tool": f"shadowserve {tool}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "rules": rules,
        "dtype": dtype,
        "sha256": {p.name: sha256_file(p) for p in files},
        **(extra or {}),
    }
    path = out_dir / "provenance.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
