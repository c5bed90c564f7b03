"""Dynamic NTK rope scaling in the native InternLM2 forward (adapters/native/internlm2.py)
is decided per sequence, by the length that sequence has alone, not by the batch's padded
width: the released code (`InternLM2DynamicNTKScalingRotaryEmbedding`) scales by its
`seq_len`, the key length of the forward, which for a sequence run alone is its own length.

A tiny InternLM2 (4 heads over 2 KV heads, wqkv biases) with random weights, packed by the
tests' own rule (tests/adapters/conftest.pack_wqkv), `max_position_embeddings` 16 and
`dynamic` factor 2, scores a batch of a 12-, a 40- and a 23-token sequence (unscaled,
scaled, scaled by another base). Each row must equal that sequence's forward alone, and the
released code's computation, written here from its definition (separate q, k, v weights,
the cached rotary tables of `_set_cos_sin_cache`, eager attention), run on each sequence
alone. A control shows the comparison can fail: the 12-token sequence with the 40-token
sequence's base (the batch-width rule) misses by far more than the tolerance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adapters.native.internlm2 import InternLM2Config, InternLM2ForCausalLM
from tests.adapters.conftest import pack_wqkv, padded

CONFIG = {
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": 64, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 16, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "dynamic", "factor": 2.0}, "hidden_act": "silu", "bias": True,
    "tie_word_embeddings": False,
}
LENGTHS = (12, 40, 23)  # <= 16: unscaled alone; 40 and 23: each its own base
ALONE = 1e-5  # a row of the batch against the same forward on that sequence alone
RELEASED = 1e-5  # against the released code's computation (another order of fp32 sums)


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The released model's tensors, q, k and v (and their biases) still separate."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    c = CONFIG
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    d = hidden // heads
    w = {"tok": rand(vocab, hidden, scale=1.0), "norm": 1 + rand(hidden), "output": rand(vocab, hidden)}
    for i in range(c["num_hidden_layers"]):
        w |= {f"{i}.q": rand(heads * d, hidden), f"{i}.k": rand(kv * d, hidden), f"{i}.v": rand(kv * d, hidden),
              f"{i}.bq": rand(heads * d), f"{i}.bk": rand(kv * d), f"{i}.bv": rand(kv * d),
              f"{i}.wo": rand(hidden, heads * d), f"{i}.bo": rand(hidden), f"{i}.w1": rand(inter, hidden),
              f"{i}.w3": rand(inter, hidden), f"{i}.w2": rand(hidden, inter),
              f"{i}.attention_norm": 1 + rand(hidden), f"{i}.ffn_norm": 1 + rand(hidden)}
    return w


def native_model(w: dict[str, torch.Tensor]) -> InternLM2ForCausalLM:
    heads, kv = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
    state = {"model.tok_embeddings.weight": w["tok"], "model.norm.weight": w["norm"], "output.weight": w["output"]}
    for i in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {
            p + "attention.wqkv.weight": pack_wqkv(w[f"{i}.q"], w[f"{i}.k"], w[f"{i}.v"], heads, kv),
            p + "attention.wqkv.bias": pack_wqkv(w[f"{i}.bq"][:, None], w[f"{i}.bk"][:, None], w[f"{i}.bv"][:, None],
                                                 heads, kv).reshape(-1),
            p + "attention.wo.weight": w[f"{i}.wo"], p + "attention.wo.bias": w[f"{i}.bo"],
            p + "feed_forward.w1.weight": w[f"{i}.w1"], p + "feed_forward.w3.weight": w[f"{i}.w3"],
            p + "feed_forward.w2.weight": w[f"{i}.w2"],
            p + "attention_norm.weight": w[f"{i}.attention_norm"], p + "ffn_norm.weight": w[f"{i}.ffn_norm"],
        }
    model = InternLM2ForCausalLM(InternLM2Config.from_dict(CONFIG))
    model.load_state_dict(state, strict=True)
    return model.eval()


class ReleasedDynamicRotary:
    """`InternLM2DynamicNTKScalingRotaryEmbedding` as released: tables cached for
    max_position_embeddings at construction, rebuilt (base raised) when a forward's
    `seq_len` exceeds the cached length."""

    def __init__(self, dim: int, max_position_embeddings: int, base: float, scaling_factor: float):
        self.dim, self.max_position_embeddings, self.base = dim, max_position_embeddings, base
        self.scaling_factor = scaling_factor
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self._set_cos_sin_cache(max_position_embeddings)

    def _set_cos_sin_cache(self, seq_len: int) -> None:
        self.max_seq_len_cached = seq_len
        if seq_len > self.max_position_embeddings:
            base = self.base * ((self.scaling_factor * seq_len / self.max_position_embeddings)
                                - (self.scaling_factor - 1)) ** (self.dim / (self.dim - 2))
            self.inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2).float() / self.dim))
        t = torch.arange(self.max_seq_len_cached, dtype=self.inv_freq.dtype)
        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos_cached, self.sin_cached = emb.cos(), emb.sin()

    def __call__(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len)
        return self.cos_cached[:seq_len], self.sin_cached[:seq_len]


def released_forward(w: dict[str, torch.Tensor], ids: list[int], seq_len: int | None = None) -> torch.Tensor:
    """The released model on one sequence alone (a fresh model: nothing cached before);
    `seq_len` overrides the length the rotary tables are asked for (the control)."""
    c = CONFIG
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    d, g, n = c["hidden_size"] // heads, heads // kv, len(ids)

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c["rms_norm_eps"]))

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., d // 2:], x[..., : d // 2]), dim=-1)

    position_ids = torch.arange(n)
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = w["tok"][torch.tensor(ids)]
    for i in range(c["num_hidden_layers"]):
        rotary = ReleasedDynamicRotary(d, c["max_position_embeddings"], c["rope_theta"], c["rope_scaling"]["factor"])
        cos, sin = rotary(seq_len or n)
        cos, sin = cos[position_ids][None], sin[position_ids][None]
        h = rms(x, w[f"{i}.attention_norm"])
        q = F.linear(h, w[f"{i}.q"], w[f"{i}.bq"]).view(n, heads, d).transpose(0, 1)
        k = F.linear(h, w[f"{i}.k"], w[f"{i}.bk"]).view(n, kv, d).transpose(0, 1)
        v = F.linear(h, w[f"{i}.v"], w[f"{i}.bv"]).view(n, kv, d).transpose(0, 1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)  # query head h·g + j uses KV head h
        scores = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + causal, dim=-1)
        x = x + F.linear((scores @ v).transpose(0, 1).reshape(n, heads * d), w[f"{i}.wo"], w[f"{i}.bo"])
        h = rms(x, w[f"{i}.ffn_norm"])
        x = x + F.linear(F.silu(F.linear(h, w[f"{i}.w1"])) * F.linear(h, w[f"{i}.w3"]), w[f"{i}.w2"])
    return F.linear(rms(x, w["norm"]), w["output"])


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, CONFIG["vocab_size"], (n,), generator=gen).tolist() for n in LENGTHS]
    w = weights()
    return w, native_model(w), prompts


def batched(model: InternLM2ForCausalLM, prompts: list[list[int]], left: bool) -> list[torch.Tensor]:
    """Each row's logits at its real positions, from one padded forward (pad id 0)."""
    ids, mask, spans = padded(prompts, left)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return [logits[row, span] for row, span in enumerate(spans)]


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_each_row_of_a_mixed_length_batch_scores_as_it_does_alone(setup, left):
    _, model, prompts = setup
    for prompt, row in zip(prompts, batched(model, prompts, left)):
        with torch.inference_mode():
            alone = model(input_ids=torch.tensor([prompt])).logits[0]
        gap = _gap(row, alone)
        print(f"{len(prompt)} tokens: max |batched - alone| = {gap:.3g}")
        assert gap <= ALONE, f"{len(prompt)}-token row: {gap}"


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_each_row_matches_the_released_code_run_on_that_sequence_alone(setup, left):
    w, model, prompts = setup
    for prompt, row in zip(prompts, batched(model, prompts, left)):
        reference = released_forward(w, prompt)
        assert reference.abs().max() > 1  # logits a wrong base would visibly move
        gap = _gap(row, reference)
        print(f"{len(prompt)} tokens: max |native batched - released alone| = {gap:.3g}")
        assert gap <= RELEASED, f"{len(prompt)}-token row: {gap}"


def test_the_batch_width_rule_is_caught(setup):
    """The control: the 12-token sequence with the base of the batch's width (40) is not
    the released computation, by far more than the tolerance."""
    w, _, prompts = setup
    short, width = prompts[0], max(LENGTHS)
    miss = _gap(released_forward(w, short, seq_len=width), released_forward(w, short))
    print(f"12 tokens scaled as 40: misses the released logits by {miss:.3g}")
    assert miss > 100 * RELEASED
