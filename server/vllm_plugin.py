"""A vLLM general plugin (entry point `vllm.general_plugins`, run by vLLM in each of its
processes: the API process, the engine core, every worker) that fixes base-model rows
of a batch mixing LoRA and base requests on vLLM's PyTorch LoRA ops.

vLLM's PyTorch LoRA ops (`vllm/lora/ops/torch_ops`, what its CPU backend runs through
`PunicaWrapperCPU`) gather `lora_weights[index]` for every token, and a base-model
token's index is -1 ("no LoRA"): Python's negative indexing hands it the *last* adapter
slot's update. With `--max-loras 2` and adapters a and b mounted, a base request batched
beside adapter requests answered exactly as b does; with `--max-loras 1`, as the one
slot's adapter. No error, just another model's answer. vLLM's Triton kernels (GPU) skip
index -1; upstream fixes for these ops are open (vllm-project/vllm#48421, #49656).

The shadow path found it: on an fp32 server with two adapters mounted, the base's
requests drifted from their fp32 reference by a mean token KL of 1.3e-3 while each
adapter's drifted 2e-11 (tests/integration/test_mounted_lora.py).

The fix wraps the three gather ops (the sgmv ones call them): base rows are left as
they were (the Triton kernels' early exit), adapter rows get the op's own numbers. It
is applied only where a one-row probe shows the installed ops alias index -1, so a
vLLM that fixed them is left alone. `SHADOWSERVE_VLLM_LORA_FIX=0` turns it off (to
see the bug).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def register() -> None:
    if os.environ.get("SHADOWSERVE_VLLM_LORA_FIX", "1") == "0":
        return
    try:
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:  # a vLLM without these ops
        return
    if getattr(lora_ops, "_shadowserve_fixed", False) or not aliases_base_rows(lora_ops.bgmv_shrink):
        return
    import vllm.lora.ops.torch_ops as package

    modules = [lora_ops, package]
    try:
        from vllm.lora.punica_wrapper import (
            punica_cpu,  # binds the names at import: patched there too
        )

        modules.append(punica_cpu)
    except ImportError:
        pass
    for name in OPS:
        fixed = skip_base_rows(getattr(lora_ops, name))
        for module in modules:
            if hasattr(module, name):
                setattr(module, name, fixed)
    lora_ops._shadowserve_fixed = True
    log.debug("shadowserve: vLLM's torch LoRA ops now leave base-model rows (index -1) alone")


def report() -> None:
    """Say, in the server's log, whether base-model rows are safe on this vLLM: its CPU
    backend runs the PyTorch ops (GPUs run Triton kernels that skip index -1)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops.torch_ops import lora_ops

    if aliases_base_rows(lora_ops.bgmv_shrink):
        log.warning("vLLM's LoRA ops here give base-model requests batched beside adapter requests an adapter's "
                    "update, and shadowserve's fix is not loaded (SHADOWSERVE_VLLM_LORA_FIX=0, or VLLM_PLUGINS leaves "
                    "out shadowserve_lora_base_rows): the base's answers can be wrong; the shadow's base lane shows it")
    else:
        log.info("vLLM's LoRA ops leave base-model rows of mixed batches alone (shadowserve's fix, or vLLM's own)")


def aliases_base_rows(bgmv_shrink) -> bool:
    """Whether the op gives a row marked -1 (no LoRA) an adapter's update."""
    import torch

    out = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 1), torch.ones(2, 1, 1, 1), out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def skip_base_rows(op):
    """`op(inputs, weights, output, indices, ...)` with rows whose index is -1 left as they
    were; the other rows computed by `op` itself, unchanged."""

    def fixed(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        base = lora_indices_tensor < 0
        if not bool(base.any()):
            return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        if bool(base.all()):
            return None
        if base.shape[0] != output_tensor.shape[0]:  # not one index per output row: nothing safe to mask
            return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)
        kept = output_tensor[base].clone()
        op(inputs, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0), *args, **kwargs)
        output_tensor[base] = kept
        return None

    fixed.__name__ = op.__name__
    fixed.__wrapped__ = op
    return fixed
