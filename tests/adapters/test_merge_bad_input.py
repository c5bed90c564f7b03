"""merge-tp's bad-input table: each refusal through the command line, as a user meets it:
non-zero exit, a message that names the problem and the way out, nothing written.
A tiny random InternEvo shard set (TP=3 x PP=2) is enough: every refusal comes before
any tensor is merged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from server.cli import main
from tests.adapters.internevo_shards import Spec, internevo_state, save_internevo_config, write_shards

TINY = {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3, "intermediate_size": 192,
        "vocab_size": 192, "num_hidden_layers": 4, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 10000.0}}


def tiny_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, inter, vocab = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"]
    kv_rows = TINY["num_key_value_heads"] * h // TINY["num_attention_heads"]
    weights = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g), "model.norm.weight": torch.ones(h)}
    for i in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv_rows, h)),
                            ("self_attn.v_proj", (kv_rows, h)), ("self_attn.o_proj", (h, h)),
                            ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)), ("mlp.down_proj", (h, inter))):
            weights[p + name + ".weight"] = torch.randn(*shape, generator=g)
        weights[p + "input_layernorm.weight"] = torch.ones(h)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(h)
    return weights


DEFAULT_SPEC = Spec(tp=3, stages=(2, 2))


def shards(tmp: Path, spec: Spec = DEFAULT_SPEC) -> Path:
    return write_shards(internevo_state(tiny_weights(), TINY, spec), TINY, spec, tmp / "src")


def hf_config_json(src: Path, **changes) -> None:
    config = {**{k: v for k, v in TINY.items() if k != "rope_parameters"}, "model_type": "internlm2", **changes}
    (src / "config.json").write_text(json.dumps(config))


def without_model_config(src: Path) -> None:
    (src / "model_config.pt").unlink()
    hf_config_json(src)


def remove(*names: str) -> Callable[[Path], None]:
    return lambda src: [(src / name).unlink() for name in names]


def rename(old: str, new: str) -> Callable[[Path], None]:
    return lambda src: (src / old).rename(src / new)


def model_config(**changes) -> Callable[[Path], None]:
    def change(src: Path) -> None:
        from tests.adapters.internevo_shards import model_config_of

        mc = {**model_config_of(TINY, Spec()), **changes}
        save_internevo_config({k: v for k, v in mc.items() if v is not None}, src / "model_config.pt")
    return change


def chunked_keys(src: Path) -> None:
    path = src / "model_tp0_pp0.pt"
    torch.save({f"0.{k}": v for k, v in torch.load(path).items()}, path)


def llama_named(src: Path) -> None:
    """Replace the set by Hugging Face Llama-named shards (separate q/k/v projections)."""
    for item in src.iterdir():
        item.unlink()
    hf_config_json(src, num_hidden_layers=1, model_type="llama")
    for t in range(3):
        torch.save({"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 96)}, src / f"model_tp{t}_pp0.pt")


def both(*changes: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda src: [change(src) for change in changes]


BAD = [
    ("a rank missing from one stage", remove("model_tp1_pp1.pt"), [],
     "tensor-parallel rank 1 of 3 is missing from pipeline stage 1 of 2 (model_tp1_pp1.pt)"),
    ("a whole rank missing", remove("model_tp1_pp0.pt", "model_tp1_pp1.pt"), [],
     "tensor-parallel rank 1 of 3 is missing (no model_tp1_pp*.pt)"),
    ("the last rank missing", remove("model_tp2_pp0.pt", "model_tp2_pp1.pt"), [],
     "only 2 rank files were found: tensor-parallel ranks 2..2 of 3 are missing"),
    ("no model_config.pt: rotary layout unknown", without_model_config, ["--no-norm-head"],
     "cannot tell the rotary layout of these InternEvo shards: there is no model_config.pt"),
    ("model_config.pt without adapt_hf", model_config(adapt_hf=None), [],
     "model_config.pt has no adapt_hf (InternEvo's InternLM2 model defaults to True"),
    ("no model_config.pt: norm head unknown", without_model_config, ["--rotary-layout", "internevo"],
     "Pass --norm-head or --no-norm-head"),
    ("a flag contradicting model_config.pt", lambda src: None, ["--rotary-layout", "hf"],
     "--rotary-layout hf contradicts the checkpoint's model_config.pt (adapt_hf=False)"),
    ("--norm-head contradicting model_config.pt", lambda src: None, ["--norm-head"],
     "--norm-head contradicts the checkpoint's model_config.pt (norm_head=False)"),
    ("an embedding split contradicting the shapes", without_model_config,
     ["--rotary-layout", "internevo", "--no-norm-head", "--embed-split", "vocab"],
     "--embed-split says the embedding is split on the vocab dim, but each rank holds [192, 32] of [192, 96]: "
     "a hidden split across 3 ranks"),
    ("the internevo rotary layout on separate q/k projections", llama_named, ["--rotary-layout", "internevo"],
     "--rotary-layout internevo re-orders q/k rows inside InternLM2's packed attention.wqkv, and these shards have none"),
    ("weight-parallel (ISP) shards", rename("model_tp0_pp0.pt", "model_tp0_wp1_pp0.pt"), [],
     "model_tp0_wp1_pp0.pt: weight-parallel (ISP) shards"),
    ("FSDP shards", rename("model_tp0_pp0.pt", "model_tp0_pp0_dp0.pt"), [], "model_tp0_pp0_dp0.pt: FSDP shards"),
    ("MoE expert shards", lambda src: torch.save({}, src / "model_moe_layer0_expert0_tp0.pt"), [],
     "mixture-of-experts shards"),
    ("interleaved pipeline chunks in the keys", chunked_keys, [], "InternEvo's interleaved pipeline (num_chunks > 1)"),
    ("interleaved pipeline in model_config.pt", model_config(num_chunks=2), [], "num_chunks=2 (interleaved pipeline)"),
    ("model_config.pt that is not a config", lambda src: torch.save(torch.nn.Linear(2, 2), src / "model_config.pt"), [],
     "cannot read InternEvo's model config (model_config.pt holds torch.nn.modules.linear.Linear"),
    ("no config at all", remove("model_config.pt"), ["--rotary-layout", "internevo", "--no-norm-head"],
     "neither config.json nor InternEvo's model_config.pt"),
    ("config.json and model_config.pt disagree", lambda src: hf_config_json(src, num_hidden_layers=5), [],
     "config.json says num_hidden_layers=5 but model_config.pt says num_layers=4"),
    ("a biased model", model_config(no_bias=False), [], "no_bias=False (a biased model)"),
    ("a shard that is not a state dict", lambda src: torch.save([torch.ones(2)], src / "model_tp1_pp0.pt"), [],
     "model_tp1_pp0.pt: expected a state dict of tensors, found list"),
    ("a shard with pickled objects", lambda src: torch.save({"w": torch.nn.Linear(2, 2)}, src / "model_tp1_pp0.pt"), [],
     "model_tp1_pp0.pt: cannot read it as a state dict of tensors"),
    ("no shard files", both(remove("model_tp0_pp0.pt", "model_tp1_pp0.pt", "model_tp2_pp0.pt", "model_tp0_pp1.pt",
                                   "model_tp1_pp1.pt", "model_tp2_pp1.pt"),
                            lambda src: torch.save({}, src / "optimizer_tp0_pp0_zo0.pt")), [],
     "no shard files named like model_tp0_pp0.pt or model_tp0_pp0.safetensors (ignored: optimizer_tp0_pp0_zo0.pt)"),
]


@pytest.mark.parametrize("change, args, needle", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_refused_with_a_message(tmp_path, capsys, change, args, needle):
    src = shards(tmp_path)
    change(src)
    dst = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["merge-tp", str(src), str(dst), *args])
    message = str(exit_.value.code)
    assert message.startswith("shadowserve merge-tp: ") and needle in message, message
    assert not dst.exists()


def test_the_tiny_set_itself_merges(tmp_path, capsys):
    """The table's baseline is good input: each row's change alone makes it bad."""
    src = shards(tmp_path)
    main(["merge-tp", str(src), str(tmp_path / "out")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_auto_map_points_at_remote_code_copied_beside_the_shards(tmp_path, capsys):
    src = shards(tmp_path)
    for module in ("configuration_internlm2", "modeling_internlm2"):
        (src / f"{module}.py").write_text("# the release's remote code\n")
    main(["merge-tp", str(src), str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_internlm2.InternLM2ForCausalLM"
    assert (tmp_path / "out" / "modeling_internlm2.py").is_file()
