"""server/vllm_plugin.py on vLLM's own PyTorch LoRA ops: the installed ops give a
base-model row (index -1) the last adapter slot's update; the fixed ones leave such rows
as they were and compute every adapter row exactly as the op does, checked against the
low-rank product computed here."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops

from server.vllm_plugin import aliases_base_rows, skip_base_rows

ORIGINAL = {name: getattr(getattr(lora_ops, name), "__wrapped__", getattr(lora_ops, name))
            for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")}
INDICES = torch.tensor([0, -1, 1, -1, 1])  # adapter 0, base, adapter 1, base, adapter 1


def test_the_installed_ops_alias_base_rows_and_the_fixed_ones_do_not():
    assert aliases_base_rows(ORIGINAL["bgmv_shrink"])  # vLLM 0.32's CPU ops: the bug is there
    assert not aliases_base_rows(skip_base_rows(ORIGINAL["bgmv_shrink"]))


def test_shrink_computes_adapter_rows_and_leaves_base_rows():
    torch.manual_seed(0)
    x, a = torch.randn(5, 8), torch.randn(2, 1, 4, 8)  # 2 slots, rank 4, width 8
    out = torch.full((5, 4), 7.0)
    skip_base_rows(ORIGINAL["bgmv_shrink"])(x, a, out, INDICES, 0.5)
    for row, slot in enumerate(INDICES.tolist()):
        want = torch.full((4,), 7.0) if slot < 0 else 0.5 * a[slot, 0] @ x[row]
        torch.testing.assert_close(out[row], want)


@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_computes_adapter_rows_and_leaves_base_rows(add_inputs):
    torch.manual_seed(1)
    x, b = torch.randn(5, 4), torch.randn(2, 1, 6, 4)  # rank 4 -> 6 outputs
    start = torch.randn(5, 6)
    out = start.clone()
    skip_base_rows(ORIGINAL["bgmv_expand"])(x, b, out, INDICES, add_inputs)
    for row, slot in enumerate(INDICES.tolist()):
        delta = b[slot, 0] @ x[row] if slot >= 0 else None
        want = start[row] if slot < 0 else (start[row] + delta if add_inputs else delta)
        torch.testing.assert_close(out[row], want)


def test_expand_slice_writes_only_its_slice_of_adapter_rows():
    torch.manual_seed(2)
    x, b = torch.randn(5, 4), torch.randn(2, 1, 3, 4)
    start = torch.randn(5, 9)
    out = start.clone()
    skip_base_rows(ORIGINAL["bgmv_expand_slice"])(x, b, out, INDICES, 3, 3, True)
    for row, slot in enumerate(INDICES.tolist()):
        want = start[row].clone()
        if slot >= 0:
            want[3:6] += b[slot, 0] @ x[row]
        torch.testing.assert_close(out[row], want)
