"""A LoRA adapter's content hash: what the candidate and a remote reference compare to
agree that they hold the same adapter (docs/design.md, "Mounted adapters on a remote
reference"). A name says nothing: two deployments may mount different weights under
one name, and a directory may be overwritten in place.

The hash covers what decides the adapter's function, in a canonical form, so two
copies of one adapter agree wherever they are stored and however the file was written:

- adapter_config.json as a JSON object with sorted keys, without the fields that
  record where or by what it was written (`LOCATION_FIELDS`);
- every tensor, by name in sorted order: its name, dtype, shape and raw bytes (a copy
  re-saved in another dtype is another adapter: its products round differently).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from adapters.lora_adapter import CONFIG, adapter_weights, read_lora_adapter

# Where the adapter was trained from and by which peft: not what it computes. The base
# path differs between a candidate's and a reference's volume for the same adapter.
LOCATION_FIELDS = frozenset({"base_model_name_or_path", "revision", "peft_version", "inference_mode"})


def adapter_sha256(path: Path) -> str:
    """The content hash (hex) of the PEFT LoRA adapter at `path`; LoraAdapterError (or
    AdapterNotFoundError) when it is not one."""
    read_lora_adapter(path)  # the same refusals as a mount: not an adapter, not LoRA, no weights
    config = json.loads((path / CONFIG).read_text())
    digest = hashlib.sha256()
    canonical = {k: v for k, v in config.items() if k not in LOCATION_FIELDS}
    digest.update(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())
    weights = adapter_weights(path)
    for name in sorted(weights.keys()):
        tensor = weights.get(name).contiguous()
        digest.update(f"\0{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
