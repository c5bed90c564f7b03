"""The noise floor's model (shadow/noise_floor.py): a copy of the reference with its
parameters in the serving dtype (buffers kept in fp32, ties kept), and low-precision
matrix products on CPU computed as bf16 hardware does them: fp32 accumulation, the result
rounded to the low-precision dtype."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from shadow.noise_floor import fp32_accumulation, serving_dtype_copy


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight
        self.norm = torch.nn.LayerNorm(8)
        self.register_buffer("inv_freq", torch.rand(4, dtype=torch.float32))


def test_the_copy_casts_parameters_keeps_buffers_and_ties():
    torch.manual_seed(0)
    model = Tied().train()
    copy = serving_dtype_copy(model, "bfloat16")
    assert {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in copy.parameters()) and not copy.training
    assert copy.head.weight is copy.embed.weight
    assert copy.inv_freq.dtype == torch.float32 and torch.equal(copy.inv_freq, model.inv_freq)
    assert torch.equal(copy.embed.weight, model.embed.weight.to(torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the reference itself is untouched


def test_low_precision_products_accumulate_in_fp32_and_round_once():
    torch.manual_seed(0)
    x, w = torch.randn(4, 256).to(torch.bfloat16), torch.randn(32, 256).to(torch.bfloat16)
    expected = (x.float() @ w.float().T).to(torch.bfloat16)
    with fp32_accumulation(torch.device("cpu")):
        linear, matmul = F.linear(x, w), torch.matmul(x, w.T)
        fp32 = F.linear(x.float(), w.float())
    assert linear.dtype == matmul.dtype == torch.bfloat16
    assert torch.equal(linear, expected) and torch.equal(matmul, expected)
    assert fp32.dtype == torch.float32 and torch.equal(fp32, x.float() @ w.float().T)  # fp32 passes through


def test_on_an_accelerator_the_native_kernels_are_left_alone():
    assert isinstance(fp32_accumulation(torch.device("cuda")), contextlib.nullcontext)
