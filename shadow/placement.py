"""The fp32 reference placed across devices with accelerate's device map, for references
larger than one device (a 20B in fp32 is 80 GB). The map is planned on an empty model
before any weight is read, so a reference that cannot fit stops the start with its size
and the memory given, never an out-of-memory error mid-traffic."""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from shadow.scoring import ShadowReferenceError

log = logging.getLogger(__name__)

GIB = 2**30


def parse_max_memory(text: str) -> dict[int | str, str]:
    """`0=70GiB,1=70GiB,cpu=200GiB[,disk=500GiB]` to accelerate's `max_memory`."""
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not size:
            raise ValueError(f"'{part}': expected DEVICE=SIZE, e.g. 0=70GiB or cpu=200GiB")
        if key.isdigit():
            out[int(key)] = size
        elif key in ("cpu", "disk", "mps"):
            out[key] = size
        else:
            raise ValueError(f"'{key}': a device is a GPU index (0, 1, ...), cpu, mps or disk")
        try:
            from accelerate.utils import convert_file_size_to_int

            convert_file_size_to_int(size)
        except (ValueError, ImportError) as exc:
            raise ValueError(f"'{size}': not a size (e.g. 70GiB, 512MiB)") from exc
    if not out:
        raise ValueError("no device given")
    return out


def _checked(value: str | None) -> str | None:
    if value is not None:
        parse_max_memory(value)
    return value


# A setting holding accelerate's max_memory as text, checked when the settings are read.
MaxMemory = Annotated[str | None, AfterValidator(_checked)]


def plan_device_map(model_dir: Path, max_memory: dict[int | str, str], trust: bool) -> tuple[dict[str, int | str], float]:
    """accelerate's map for the fp32 model within `max_memory` (no weight read), and the
    model's fp32 size in bytes. Refuses a map that spills to disk unless disk was given."""
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    for device in max_memory:
        if isinstance(device, int) and device >= torch.cuda.device_count():
            raise ShadowReferenceError(f"--max-memory names GPU {device}, but {torch.cuda.device_count()} are visible")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust)
    empty.tie_weights()
    size = compute_module_sizes(empty, dtype=torch.float32)[""]
    given = ", ".join(f"{k}={v}" for k, v in max_memory.items())
    device_map = infer_auto_device_map(empty, max_memory=dict(max_memory), dtype=torch.float32,  # it edits its copy
                                       no_split_module_classes=list(empty._no_split_modules or ()))
    if "disk" in device_map.values() and "disk" not in max_memory:
        raise ShadowReferenceError(
            f"the fp32 reference needs {size / GIB:.2f} GiB and does not fit in the memory given ({given}): "
            "give more devices or memory, or allow offloading with disk=SIZE (slow)")
    return device_map, size


def load_placed(model_dir: Path, max_memory: dict[int | str, str], trust: bool):
    """The fp32 model dispatched by accelerate across `max_memory`'s devices."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapters.model_dir import exact_attention

    device_map, size = plan_device_map(model_dir, max_memory, trust)
    offload = tempfile.mkdtemp(prefix="shadowserve-offload-") if "disk" in device_map.values() else None
    placed = Counter(str(d) for d in device_map.values())
    log.info("shadow: fp32 reference (%.2f GiB) placed across %s", size / GIB,
             ", ".join(f"{device}: {n} module(s)" for device, n in placed.items()))
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device_map,
                                                     offload_folder=offload, trust_remote_code=trust,
                                                     **exact_attention(model_dir))
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        raise ShadowReferenceError(f"the fp32 reference ({size / GIB:.2f} GiB) could not be placed: {exc}") from exc
    return model, device_map


def offloaded(device_map: dict[str, int | str]) -> bool:
    """Whether some modules run from weights kept elsewhere (disk, or CPU beside GPUs)."""
    devices = set(device_map.values())
    return "disk" in devices or ("cpu" in devices and any(isinstance(d, int) for d in devices))
