"""The reference in the candidate's serving dtype: the model whose drift from the fp32
reference is the noise floor (docs/design.md, "Noise floor and verdict").

It is a real low-precision copy of the reference: parameters cast to the serving dtype
(bf16/fp16), activations, residual stream and norms running in that dtype, exactly as
a bf16 checkpoint runs in transformers. Buffers (rotary `inv_freq`) stay in fp32: vLLM
and transformers both build the rotary tables in fp32 and cast cos/sin to the model
dtype.

On a CPU without bf16/fp16 matrix units, PyTorch's bf16 GEMMs are ~6x slower than fp32
(measured on the 2-core development machine), which would make the noise floor cost
six reference passes. `fp32_accumulation()` runs every matrix product of low-precision
tensors as the hardware that serves bf16 does (GPU tensor cores, oneDNN on CPU): inputs
in bf16, products accumulated in fp32, the result rounded to bf16. Only the kernel
changes, not the numbers a bf16 GEMM with fp32 accumulation produces (up to summation
order), and the pass costs about what the fp32 pass does. On CUDA the native kernels
already do this, fast, and are used as they are.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOW_PRECISION = (torch.bfloat16, torch.float16)
_PRODUCTS = {
    F.linear, torch.matmul, torch.bmm, torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__,
    torch.Tensor.bmm, F.scaled_dot_product_attention,
}


def serving_dtype_copy(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """A copy of `model` with its parameters in `dtype` (buffers untouched), built one
    parameter at a time: peak memory is the low-precision copy, not a second fp32 one.
    Tied parameters stay tied."""
    target = DTYPES[dtype]
    memo = {
        id(p): torch.nn.Parameter(p.detach().to(target), requires_grad=False)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo).eval()


class _Fp32Accumulation(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor)), None)
            if dtype in LOW_PRECISION:
                args = tuple(_up(a) for a in args)
                kwargs = {k: _up(v) for k, v in kwargs.items()}
                return func(*args, **kwargs).to(dtype)
        return func(*args, **kwargs)


def _up(value):
    return value.float() if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION else value


def fp32_accumulation(device: torch.device):
    """Low-precision matrix products with fp32 accumulation, where the native kernels are
    slow (CPU); a no-op elsewhere."""
    return _Fp32Accumulation() if device.type == "cpu" else contextlib.nullcontext()
