"""The native InternLM2 forward under PyTorch tensor parallelism (adapters/native/internlm2_tp)
gives the one-process logits: a tiny InternLM2 (6 heads over 2 KV heads, g = 3) with random
weights, packed by the tests' own rule (tests/adapters/conftest.pack_wqkv, not the
converter's), run whole in this process and cut over 2 gloo ranks (one spawn, every case
in it). Negative controls show the comparison can fail: the wo bias counted twice, and
wqkv's rows cut as [q; k; v] blocks instead of per KV group, both miss by far more than
the tolerance; a config whose KV heads do not divide by 2 (while its heads do) is refused,
naming the KV heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.native.internlm2 import load_internlm2
from shadow.scoring import ScoreItem
from tests.adapters.conftest import pack_wqkv

RANKS = 2
TOLERANCE = 1e-4
BASE = {
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "vocab_size": 128, "hidden_size": 48,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
    "hidden_act": "silu", "bias": False, "tie_word_embeddings": False, "torch_dtype": "float32",
}
CASES = {
    "plain": {},
    # Dynamic NTK per row: the 11-token row (> 8 positions) gets a raised rope base, the 6-token row not.
    "bias-dynamic-rope": {"bias": True, "max_position_embeddings": 8, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    "tied": {"tie_word_embeddings": True},
}
# Heads 6 divide by 2, KV heads 3 do not: a cut by heads alone would split a KV group.
UNEVEN = {"num_key_value_heads": 3}
PROMPTS = [[5, 17, 99, 3, 64, 2, 81, 40, 7, 120, 33], [9, 1, 56, 23, 88, 14]]
ITEMS = [ScoreItem(p[:3], p[3:], [[t, (t + 1) % 128] for t in p[3:]]) for p in PROMPTS]  # for the scorer
FIRST = 4  # the scorer's `logits_to_keep` from this position on


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (pad id 0) with its attention mask."""
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):
        ids[row, : len(prompt)], mask[row, : len(prompt)] = torch.tensor(prompt), 1
    return ids, mask


def write_checkpoint(out: Path, config: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = hidden // heads
    state = {"model.tok_embeddings.weight": rand(vocab, hidden, scale=1.0), "model.norm.weight": 1 + rand(hidden)}
    if not config["tie_word_embeddings"]:
        state["output.weight"] = rand(vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state[p + "attention.wqkv.weight"] = pack_wqkv(rand(heads * d, hidden), rand(kv * d, hidden), rand(kv * d, hidden),
                                                       heads, kv)
        state[p + "attention.wo.weight"] = rand(hidden, heads * d)
        if config["bias"]:
            packed = pack_wqkv(rand(heads * d, 1), rand(kv * d, 1), rand(kv * d, 1), heads, kv)
            state[p + "attention.wqkv.bias"] = packed.reshape(-1)
            state[p + "attention.wo.bias"] = rand(hidden, scale=1.0)
        state[p + "feed_forward.w1.weight"] = rand(inter, hidden)
        state[p + "feed_forward.w3.weight"] = rand(inter, hidden)
        state[p + "feed_forward.w2.weight"] = rand(hidden, inter)
        state[p + "attention_norm.weight"] = 1 + rand(hidden)
        state[p + "ffn_norm.weight"] = 1 + rand(hidden)
    out.mkdir()
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))


def qkv_blocks(weight: torch.Tensor, heads: int, kv: int) -> torch.Tensor:
    """wqkv's rows re-ordered [all q; all k; all v] (a Llama-style fused layout): cut
    evenly, rank 0 gets only query heads. The wrong split the per-group packing avoids."""
    d = weight.shape[0] // (heads + 2 * kv)
    g = heads // kv
    rows = weight.reshape(kv, g + 2, d, -1)
    return torch.cat([rows[:, :g].reshape(heads * d, -1), rows[:, g].reshape(kv * d, -1),
                      rows[:, g + 1].reshape(kv * d, -1)]).reshape(weight.shape)


def _rank(rank: int, root: str) -> None:
    """One tensor-parallel rank: every case, the refusal and the controls; saves its results."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from adapters.errors import AdapterError
    from adapters.native.internlm2_tp import load_parallel, parallelize

    torch.set_num_threads(1)
    root_dir = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{root_dir / 'store'}", rank=rank, world_size=RANKS)
    try:
        mesh = init_device_mesh("cpu", (RANKS,))
        ids, mask = batch()
        keep = torch.arange(FIRST, ids.shape[1])
        out: dict = {}

        def logits(model) -> torch.Tensor:
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask).logits

        for name in CASES:
            model = load_parallel(root_dir / name, torch.float32, "cpu", mesh)
            out[name] = logits(model)
            with torch.inference_mode():
                out[name + "/keep"] = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            attention = model.model.layers[0].attention
            local = {n: p.to_local() for n, p in model.named_parameters() if hasattr(p, "to_local")}
            out[name + "/local"] = {
                "heads": (attention.heads, attention.kv_heads),
                "shapes": {n: tuple(t.shape) for n, t in local.items()},
                # The cut tensors own their storage: the whole ones are freed.
                "owned": all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in local.values()),
            }
        try:
            load_parallel(root_dir / "uneven", torch.float32, "cpu", mesh)
        except AdapterError as exc:
            out["refused"] = str(exc)

        twice = load_internlm2(root_dir / "bias-dynamic-rope")
        for layer in twice.model.layers:
            layer.attention.wo.bias.data *= RANKS  # as if each rank added the whole bias
        out["control/bias-per-rank"] = logits(parallelize(twice, mesh))
        blocks = load_internlm2(root_dir / "plain")
        for layer in blocks.model.layers:
            layer.attention.wqkv.weight.data = qkv_blocks(layer.attention.wqkv.weight.data, 6, 2)
        out["control/qkv-blocks"] = logits(parallelize(blocks, mesh))
        out["scorer"] = _scorer_side(rank, root_dir / "plain")
        torch.save(out, root_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _scorer_side(rank: int, model_dir: Path):
    """The reference service's scorer on this forward (shadow/tensor_parallel.py): rank 0
    scores, rank 1 follows its broadcast until told to stop."""
    from shadow.tensor_parallel import Ranks, TensorParallelScorer

    scorer = TensorParallelScorer.load(model_dir, Ranks(rank, RANKS, rank, torch.device("cpu")), timeout_s=60)
    scorer.enable_noise_floor("bfloat16")
    if rank:
        return {"followed": scorer.follow(), "loaded_as": scorer.loaded_as}
    scored = scorer.score_sync(ITEMS, top_m=5, noise_top_k=4)
    scorer.stop_ranks()
    return {"scored": scored, "loaded_as": scorer.loaded_as}


def write_vocab(model_dir: Path, size: int) -> None:
    """A word-level tokenizer.json of `size` ids: what the native forward's vocabulary reads."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0")).save(str(model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("internlm2_tp")


@pytest.fixture(scope="module")
def runs(root) -> tuple[dict, list[dict]]:
    """The one-process logits per case, and each rank's results."""
    import torch.multiprocessing as mp

    for seed, (name, change) in enumerate(CASES.items()):
        write_checkpoint(root / name, {**BASE, **change}, seed)
    write_vocab(root / "plain", BASE["vocab_size"])
    (root / "uneven").mkdir()  # refused from its config, before any weight is read
    (root / "uneven" / "config.json").write_text(json.dumps({**BASE, **UNEVEN}))
    ids, mask = batch()
    whole = {}
    for name in CASES:
        with torch.inference_mode():
            whole[name] = load_internlm2(root / name)(input_ids=ids, attention_mask=mask).logits
    mp.spawn(_rank, args=(str(root),), nprocs=RANKS, join=True)
    return whole, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(RANKS)]  # our own files


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_gets_the_one_process_logits(runs, case):
    whole, ranks = runs
    assert whole[case].abs().max() > 1  # logits that a wrong cut would visibly move
    for rank, result in enumerate(ranks):
        gap = _gap(result[case], whole[case])
        print(f"{case} rank {rank}: max |TP - one process| = {gap:.3g}")
        assert gap <= TOLERANCE, f"{case}, rank {rank}: {gap}"
        assert _gap(result[case + "/keep"], whole[case][:, FIRST:]) <= TOLERANCE


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_holds_whole_kv_groups(runs, case):
    """Rank-local heads 3 over 1 KV head: wqkv's (6 + 2·2)·8 rows in halves, 40 each."""
    for result in runs[1]:
        local = result[case + "/local"]
        assert local["heads"] == (3, 1)
        shapes = local["shapes"]
        assert shapes["model.layers.0.attention.wqkv.weight"] == (40, 48)
        assert shapes["model.layers.0.attention.wo.weight"] == (48, 24)
        assert shapes["model.layers.0.feed_forward.w2.weight"] == (48, 32)
        assert shapes["output.weight"] == (64, 48)
        if CASES[case].get("bias"):
            assert shapes["model.layers.0.attention.wqkv.bias"] == (40,)
            assert shapes["model.layers.0.attention.wo.bias"] == (48,)  # replicated, added once
        assert local["owned"]


def test_an_uneven_kv_split_is_refused_naming_the_kv_heads(runs):
    for result in runs[1]:
        message = result.get("refused", "")
        assert "KV heads (num_key_value_heads) 3 does not divide by tensor-parallel size 2" in message
        assert "num_attention_heads" not in message  # the heads (6) divide; only the groups do not


def test_the_comparison_catches_a_bias_per_rank_and_a_cut_inside_kv_groups(runs):
    whole, ranks = runs
    for rank, result in enumerate(ranks):
        bias, blocks = (_gap(result["control/bias-per-rank"], whole["bias-dynamic-rope"]),
                        _gap(result["control/qkv-blocks"], whole["plain"]))
        print(f"rank {rank}: controls miss by {bias:.3g} (bias per rank), {blocks:.3g} (qkv blocks)")
        assert bias > 100 * TOLERANCE
        assert blocks > 100 * TOLERANCE


def test_the_reference_scorer_on_two_ranks_scores_as_one_process(runs, root):
    """Rank 0 broadcasts the batch, both ranks run it, rank 0's statistics are the
    one-process scorer's; rank 1 leaves its loop with 0 when rank 0 stops."""
    from shadow.local_scorer import LocalScorer

    ranks = runs[1]
    assert ranks[1]["scorer"]["followed"] == 0
    assert "tensor parallel over 2 ranks" in ranks[0]["scorer"]["loaded_as"]
    one = LocalScorer.load(root / "plain", device="cpu")
    one.enable_noise_floor("bfloat16")
    here = one.score_sync(ITEMS, top_m=5, noise_top_k=4)
    for a, b in zip(here, ranks[0]["scorer"]["scored"]):
        for p, q in zip(a.reference, b.reference):
            assert p.top_ids == q.top_ids
            shared = set(p.logprobs) & set(q.logprobs)
            assert max(abs(p.logprobs[t] - q.logprobs[t]) for t in shared) <= TOLERANCE
        assert len(a.noise) == len(b.noise)
