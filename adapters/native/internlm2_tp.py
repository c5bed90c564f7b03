"""The native InternLM2 forward (adapters/native/internlm2.py) split over N tensor-parallel
ranks with PyTorch's tensor-parallel API (DTensor), for a reference too large for one device.

The plan, per decoder layer, over a 1-D DeviceMesh of size N:

- `attention.wqkv` column-wise (its rows, and its bias, cut into N equal parts). The rows
  are packed per KV head, [kv_heads, g + 2, head_dim] (g query heads, then the key, then
  the value), so an even cut gives each rank kv_heads / N whole groups, each with its g
  query heads, its key and its value: attention runs on the local heads with no
  communication. That holds exactly when N divides kv_heads (and then the heads); a
  config that does not split evenly is refused before anything is cut, naming the
  dimension (adapters/tensor_parallel.problems). Each rank's `Attention` gets the local
  counts (`heads`, `kv_heads`: global / N), which its forward reshapes with.
- `attention.wo` row-wise: each rank multiplies its heads' slice of the input, the partial
  sums are all-reduced. Its bias (config `bias`) stays whole on every rank (RowwiseParallel
  makes it a Replicate DTensor) and DTensor's rules add it once to the reduced sum, not
  once per rank (the test's bias case checks it, against a bias-per-rank control).
- `feed_forward.w1`, `w3` column-wise, `w2` row-wise (one all-reduce); the MLP has no bias.
- `output` column-wise over the vocabulary, its output gathered (Replicate): every rank
  gets the full logits, so the caller's code is the one-process code.
- `model.tok_embeddings` and the RMSNorms stay replicated (whole on every rank). With
  `tie_word_embeddings` the head and the embedding are one tensor in the checkpoint: here
  the embedding keeps the whole table and the head gets its own copy of its vocabulary
  rows (equal values; the tie is not kept, which inference does not need).
- Rotary embeddings (default, linear, dynamic NTK) depend on the positions and each row's
  length only (from the attention mask, replicated), identical on every rank: unchanged.

Two all-reduces per layer and one all-gather of the logits per forward.

Memory (`load_parallel`): each rank reads the whole checkpoint into host memory in
`dtype` (N ranks on one host: N full copies at the peak), then keeps its shards on
`device`: 1/N of every linear layer (the output head included) plus the whole embedding
table and the norms; the full tensors are freed as they are cut (each shard is a copy).
The device never holds more than those plus one full tensor in transit. Every rank
cuts its own copy (no scatter from rank 0), so all ranks must read the same checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from adapters.errors import AdapterError
from adapters.native.internlm2 import InternLM2ForCausalLM, load_internlm2
from adapters.tensor_parallel import problems

PLAN = {
    "model.layers.*.attention.wqkv": ColwiseParallel(),
    "model.layers.*.attention.wo": RowwiseParallel(),
    "model.layers.*.feed_forward.w1": ColwiseParallel(),
    "model.layers.*.feed_forward.w3": ColwiseParallel(),
    "model.layers.*.feed_forward.w2": RowwiseParallel(),
    "output": ColwiseParallel(output_layouts=Replicate()),
}


def check(config: dict, size: int) -> None:
    """Raises AdapterError unless `size` ranks split the model `config` evenly."""
    lines = problems(config, size)
    if lines:
        raise AdapterError("InternLM2 cannot be split over tensor-parallel size "
                           f"{size} (each rank must hold whole KV-head groups): " + "; ".join(lines))


def parallelize(model: InternLM2ForCausalLM, mesh: DeviceMesh) -> InternLM2ForCausalLM:
    """`model` (whole, as `load_internlm2` returns it, the same weights on every rank) cut
    in place over the 1-D `mesh` by the plan above; returns it. Its forward keeps the
    one-process signature and returns the full logits on every rank. Parameters not cut
    (embeddings, norms) are moved to the mesh's device type, as the cut ones are."""
    if mesh.ndim != 1:
        raise AdapterError(f"InternLM2 tensor parallelism takes a 1-D device mesh, not {mesh.ndim}-D")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise AdapterError("this InternLM2 model is already parallelized")
    size = mesh.size()
    check(dataclasses.asdict(model.config), size)
    # Every rank loaded the same checkpoint: cut the local copy, no scatter from rank 0.
    parallelize_module(model, mesh, PLAN, src_data_rank=None)
    for layer in model.model.layers:
        attention = layer.attention
        attention.heads //= size
        attention.kv_heads //= size  # groups (heads per KV head) is unchanged
    model.tp_size = size
    device = torch.device(mesh.device_type)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, DTensor) and param.device.type != device.type:
                module.register_parameter(name, torch.nn.Parameter(param.data.to(device), requires_grad=param.requires_grad))
    return model


def load_parallel(model_dir: Path, dtype: torch.dtype, device: str | torch.device, mesh: DeviceMesh) -> InternLM2ForCausalLM:
    """The released InternLM2 checkpoint in `model_dir`, cut over `mesh` (this rank's part
    on `device`, whose type must be the mesh's: set the rank's current CUDA device first).
    Loads the whole checkpoint on CPU, then `parallelize` (see the module's memory note).
    Call it on every rank of the mesh; then `model(input_ids=..., attention_mask=...,
    logits_to_keep=...)` as the one-process scorer does, on every rank, same inputs."""
    from adapters.model_dir import read_config

    target = torch.device(device)
    if target.type != mesh.device_type:
        raise AdapterError(f"device {device} is not of the mesh's device type {mesh.device_type}")
    if target.type != "cpu" and target.index is not None \
            and target.index != torch.get_device_module(target.type).current_device():
        raise AdapterError(f"device {device} is not this rank's current {target.type} device "
                           f"(DTensor places shards there): call torch.{target.type}.set_device({target.index}) first")
    check(read_config(model_dir), mesh.size())  # before reading any weights
    return parallelize(load_internlm2(model_dir, dtype, "cpu"), mesh)
