"""InternLM2 in its released layout, as a plain PyTorch module: the reference forward for
InternLM2 originals, without the checkpoint's remote code.

Written from the released model's definition (`modeling_internlm2.py` of internlm2-chat-7b),
tensor names as it saves them:

- `model.tok_embeddings`, `model.layers.N.{attention_norm, attention.wqkv, attention.wo,
  ffn_norm, feed_forward.w1, .w3, .w2}`, `model.norm`, `output` (untied unless the config
  says `tie_word_embeddings`); `wqkv` and `wo` carry biases when the config's `bias` is on.
- `attention.wqkv` packs q, k and v per KV head: its rows are [kv_heads, g + 2, head_dim]
  with g = heads / kv_heads: the g query heads of that KV head, then its key, then its
  value. Query head j of KV head h is head h·g + j, and it attends with KV head h.
- RMSNorm in fp32, cast back, times the weight; SwiGLU MLP w2(silu(w1 x) · w3 x);
  rotary embeddings on the two halves of each head (rotate_half), tables in fp32.
- Rope scaling: `linear` divides positions by the factor; `dynamic` (NTK) raises the base
  to base·(f·L/max_pos − (f − 1))^(d/(d−2)) when the sequence's length L exceeds
  `max_position_embeddings`. L is per row: its real (unpadded) tokens, the length the
  released code sees when it runs that sequence alone (its `seq_len`, the key length),
  so a short row padded beside a long one is scored as it is alone, not scaled by the
  batch's padded width. The released code keeps the longest length it has seen in a
  cache, so its tables depend on what ran before; here they depend on the row only.

The rotary tables are computed in each forward from the positions, not kept as buffers,
so there is nothing to leave unmaterialised (the failure of the released code under
transformers 5's meta-device init). Padding (left or right) is handled by the attention
mask: positions count real tokens only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import AdapterError
from adapters.model_dir import read_config

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# Derived tables some checkpoints save; this forward computes them.
_DERIVED = re.compile(r"rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
ROPE_TYPES = ("default", "linear", "dynamic")


@dataclass(frozen=True)
class InternLM2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_factor: float
    max_position_embeddings: int
    bias: bool
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict) -> InternLM2Config:
        heads = config["num_attention_heads"]
        kv = config.get("num_key_value_heads") or heads
        if heads % kv or config["hidden_size"] % heads:
            raise AdapterError(f"InternLM2 config: {heads} heads, {kv} KV heads and hidden size "
                               f"{config['hidden_size']} do not divide evenly")
        if config.get("hidden_act", "silu") != "silu":
            raise AdapterError(f"InternLM2 config: hidden_act {config['hidden_act']!r}; the released model uses silu")
        scaling = config.get("rope_scaling") or {}
        rope_type = scaling.get("type", scaling.get("rope_type", "default"))
        if rope_type not in ROPE_TYPES:
            raise AdapterError(f"InternLM2 config: rope_scaling type {rope_type!r} (the released code knows "
                               f"{', '.join(ROPE_TYPES[1:])})")
        return cls(
            vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta", 10000.0)), rope_type=rope_type,
            rope_factor=float(scaling.get("factor", 1.0)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            bias=bool(config.get("bias", False)), tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


@dataclass
class CausalLMOutput:
    logits: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: InternLM2Config):
        super().__init__()
        # The forward reshapes by these, never by the config: under tensor parallelism
        # (internlm2_tp) they are the rank's own, heads / N and kv_heads / N.
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.groups = self.heads // self.kv_heads
        self.wqkv = nn.Linear(c.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=c.bias)
        self.wo = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=c.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        packed = self.wqkv(x).view(b, t, self.kv_heads, self.groups + 2, self.head_dim)
        q = packed[..., : self.groups, :].reshape(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = packed[..., self.groups, :].transpose(1, 2)  # [b, kv_heads, t, d]
        v = packed[..., self.groups + 1, :].transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k, v = k.repeat_interleave(self.groups, dim=1), v.repeat_interleave(self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim))
        return self.wo(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, c: InternLM2Config):
        super().__init__()
        self.w1 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.w3 = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.w2 = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: InternLM2Config):
        super().__init__()
        self.attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attention = Attention(c)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.feed_forward = FeedForward(c)

    def forward(self, x, cos, sin, mask):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2Model(nn.Module):
    def __init__(self, c: InternLM2Config):
        super().__init__()
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, c: InternLM2Config):
        super().__init__()
        self.config = c
        self.model = InternLM2Model(c)
        self.output = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    def get_decoder(self) -> InternLM2Model:
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int | torch.Tensor = 0) -> CausalLMOutput:
        """`logits_to_keep`: 0 all positions, n the last n, or a tensor of positions (as
        transformers' models take it)."""
        b, t = input_ids.shape
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        positions = (real.long().cumsum(-1) - 1).clamp_min(0)
        x = self.model.tok_embeddings(input_ids)
        # Each row's own length (its real tokens = its last position + 1), not the padded width t.
        cos, sin = self._rotary(positions, real.sum(-1), x.dtype)
        causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
        # A padding query would see no key at all (a NaN row): let it see itself; its output is never read.
        mask = (causal & real[:, None, None, :]) | torch.eye(t, dtype=torch.bool, device=input_ids.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        x = self.model.norm(x)
        if isinstance(logits_to_keep, torch.Tensor):
            x = x[:, logits_to_keep]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        return CausalLMOutput(self.output(x))

    def _rotary(self, positions: torch.Tensor, lengths: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [b, 1, t, d] for `positions` [b, t]; `lengths` [b] is each row's length
        alone, which decides its dynamic NTK base (rows of one batch may differ)."""
        c, d = self.config, self.config.head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) / d
        if c.rope_type == "dynamic":
            # The base in double, as the released code computes it in Python, then float32 for the power.
            length = lengths.clamp_min(c.max_position_embeddings).to(  # (no NaN in the rows left unscaled)
                torch.float64 if positions.device.type != "mps" else torch.float32)
            scaled = c.rope_theta * (c.rope_factor * length / c.max_position_embeddings
                                     - (c.rope_factor - 1)) ** (d / (d - 2))
            base = torch.where(lengths > c.max_position_embeddings, scaled, torch.full_like(scaled, c.rope_theta))
            inv_freq = 1.0 / (base.float()[:, None] ** exponents)  # [b, d/2]: one base per row
        else:
            inv_freq = (1.0 / (c.rope_theta ** exponents)).expand(positions.shape[0], -1)
        t = positions.float() / (c.rope_factor if c.rope_type == "linear" else 1.0)
        freqs = t[..., None] * inv_freq[:, None, :]  # [b, t, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, t, d]: broadcast over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def load_internlm2(model_dir: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> InternLM2ForCausalLM:
    """The released checkpoint in `model_dir` (safetensors or PyTorch shards), in `dtype`
    on `device`. Refuses tensors that are missing, unknown or of the wrong shape, naming them."""
    from adapters.tensor_io import open_checkpoint

    config = InternLM2Config.from_dict(read_config(model_dir))
    with torch.device("meta"):
        model = InternLM2ForCausalLM(config)
    expected = dict(model.state_dict())
    sources = open_checkpoint(model_dir)
    state, unknown = {}, []
    for name, source in sources.items():
        if _DERIVED.search(name):
            continue
        if name not in expected:
            unknown.append(name)
            continue
        shape = tuple(source.shape(name))
        if shape != tuple(expected[name].shape):
            raise AdapterError(f"{model_dir}: {name} has shape {list(shape)}, the config makes it "
                               f"{list(expected[name].shape)}")
        state[name] = source.get(name).to(device=device, dtype=dtype)
    if config.tie_word_embeddings and "output.weight" not in state and "model.tok_embeddings.weight" in state:
        state["output.weight"] = state["model.tok_embeddings.weight"]
    missing = sorted(set(expected) - set(state), key=_key_order)
    if unknown or missing:
        problems = ([f"unknown tensors {_few(unknown)}"] if unknown else []) + ([f"missing {_few(missing)}"] if missing else [])
        raise AdapterError(f"{model_dir}: not the released InternLM2 layout: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _key_order(name: str) -> tuple[int, str]:
    match = _LAYER_KEY.match(name)
    return (int(match.group(1)) if match else -1, name)


def _few(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
