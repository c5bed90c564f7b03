"""Mounted adapters before any engine starts: the reference mounts each one unmerged on
the one base (a tiny random Llama here, independent peft models to check it against),
and the settings refuse what cannot be mounted with the reason: a missing directory, a
rank above --max-lora-rank, an adapter trained for another base, a clash of names, the
transformers engine, a remote reference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from adapters.lora_adapter import check_lora_adapter
from server.settings import ServeSettings
from shadow.local_scorer import LocalScorer
from shadow.scoring import ScoreItem, ShadowReferenceError

ITEM = ScoreItem([1, 2, 3, 4], [5, 6, 7], [[5], [6], [7]])


def tiny(root: Path, name: str, hidden: int = 64, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / name)
    return root / name


def adapter(base: Path, out: Path, seed: int, rank: int = 4) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny(root, "base")
    other = tiny(root, "other", hidden=32)
    return {"base": base, "a": adapter(base, root / "a", 1), "b": adapter(base, root / "b", 2),
            "rank32": adapter(base, root / "rank32", 3, rank=32), "foreign": adapter(other, root / "foreign", 4),
            "root": root}


def peft_logprobs(base: Path, lora: Path | None, dtype=torch.float32) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(base, dtype=dtype)
    if lora is not None:
        model = PeftModel.from_pretrained(model, lora, autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5, 6]])).logits[0, 3:].float()
    return torch.log_softmax(logits, -1)


def scored(scorer: LocalScorer, adapter: str | None) -> list[float]:
    out = scorer.score_sync([ITEM], 2, 2, adapter)[0]
    return [out.reference[i].logprobs[t] for i, t in enumerate(ITEM.output_ids)]


def test_the_reference_applies_each_adapter_unmerged_on_one_base(models):
    model = LlamaForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    scorer = LocalScorer(model, _Tokenizer(), "tiny", torch.device("cpu"))
    scorer.enable_noise_floor("bfloat16")
    before = scored(scorer, None)
    base_storage = {p.data_ptr() for p in model.parameters()}
    scorer.add_adapter("a", models["a"])
    scorer.add_adapter("b", models["b"])
    for name in ("a", "b"):  # each as an independent peft model of its own computes it, in fp32
        want = peft_logprobs(models["base"], models[name])
        got = scored(scorer, name)
        assert max(abs(g - want[i, t].item()) for i, (g, t) in enumerate(zip(got, ITEM.output_ids))) < 1e-5
    assert scored(scorer, "a") != scored(scorer, "b")
    assert scored(scorer, None) == before  # the base's requests run with every adapter off
    # One base in memory: the fp32 reference's base weights are the ones it loaded, not copies.
    base_params = {p.data_ptr() for n, p in scorer._model.named_parameters() if "lora_" not in n}
    assert base_params == base_storage
    # The noise floor runs the adapter in the serving dtype, like the engine: not the fp32 numbers.
    noise = scorer.score_sync([ITEM], 2, 2, "a")[0].noise
    assert any(abs(noise[i][t] - scored(scorer, "a")[i]) > 0 for i, t in enumerate(ITEM.output_ids))
    assert all(p.dtype == torch.bfloat16 for n, p in scorer._noise_model.named_parameters() if ".lora_A.a." in n)
    with pytest.raises(ShadowReferenceError, match="not mounted"):
        scorer.score_sync([ITEM], 2, None, "c")
    scorer.remove_adapter("a")
    scorer.remove_adapter("b")
    assert scorer.mounted == [] and scored(scorer, None) == before


def test_a_mount_that_fails_leaves_the_reference_as_it_was(models):
    model = LlamaForCausalLM.from_pretrained(models["base"], dtype=torch.float32).eval()
    scorer = LocalScorer(model, _Tokenizer(), "tiny", torch.device("cpu"))
    scorer.enable_noise_floor("bfloat16")
    before = scored(scorer, None)
    for mounted in ([], ["a"]):  # the first mount (peft wraps the model) and a later one
        with pytest.raises(ShadowReferenceError, match="could not mount the adapter f"):
            scorer.add_adapter("f", models["foreign"])  # another base's shapes: fails after peft inserted its layers
        assert scorer.mounted == mounted
        assert not any("lora_" in n and ".f." in n for n, _ in scorer._model.named_parameters())
        assert scored(scorer, None) == before
        if not mounted:
            assert not any("lora_" in n for n, _ in scorer._model.named_parameters())
            scorer.add_adapter("a", models["a"])
    want = peft_logprobs(models["base"], models["a"])
    assert max(abs(g - want[i, t].item()) for i, (g, t) in enumerate(zip(scored(scorer, "a"), ITEM.output_ids))) < 1e-5


class _Tokenizer:
    pad_token_id = 0

    def get_vocab(self):
        return {f"t{i}": i for i in range(128)}

    def __len__(self):
        return 128


def settings(models, *modules: str, **extra) -> ServeSettings:
    return ServeSettings(model=models["base"], lora_modules=list(modules), **extra)


def test_mountable_adapters_pass_with_their_rank(models):
    s = settings(models, f"a={models['a']}", json.dumps({"name": "b", "path": str(models["b"])}))
    assert s.lora_mounts() == [("a", models["a"]), ("b", models["b"])]
    assert s.lora_rank_limit([4]) == 16 and s.lora_rank_limit([32]) == 32 and s.lora_capacity == 2
    assert check_lora_adapter(models["a"], models["base"]).rank == 4


@pytest.mark.parametrize("case, match", [
    ("missing", "no LoRA adapter there"),
    ("rank", "rank 32 is above --max-lora-rank 16"),
    ("foreign", "trained for another base"),
    ("twice", "given twice"),
    ("base name", "base model's served name"),
    ("transformers", "not available with --engine transformers"),
    ("reference flags, shadow off", "configure the shadow's reference, but the shadow is off"),
    ("reference name", "no --lora-modules adapter has that name"),
])
def test_what_cannot_be_mounted_is_refused_before_loading(models, case, match):
    a = f"a={models['a']}"
    args = {
        "missing": ([f"a={models['root'] / 'nope'}"], {}),
        "rank": ([f"r={models['rank32']}"], {"max_lora_rank": 16}),
        "foreign": ([f"f={models['foreign']}"], {}),
        "twice": ([a, a], {}),
        "base name": ([f"base={models['a']}"], {}),
        "transformers": ([a], {"engine": "transformers"}),
        "reference flags, shadow off": ([a], {"shadow_reference_url": "http://reference:9000"}),
        "reference name": ([a], {"shadow_rate": 0.5, "shadow_reference_lora_modules": [f"z={models['a']}"]}),
    }[case]
    with pytest.raises(ValidationError, match=match):
        settings(models, *args[0], **args[1])


def test_the_cli_stops_with_the_reason_and_exit_2(models):
    run = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(models["base"]),
                          "--lora-modules", f"f={models['foreign']}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "trained for another base" in run.stderr and "lora_A must be [4, 128]" in run.stderr


def test_a_dora_full_module_or_corrupt_adapter_is_refused(models, tmp_path):
    for key, value, match in (("use_dora", True, "DoRA"), ("modules_to_save", ["lm_head"], "whole modules")):
        changed = tmp_path / key
        shutil.copytree(models["a"], changed)
        config = json.loads((changed / "adapter_config.json").read_text())
        (changed / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=match):
            check_lora_adapter(changed, models["base"])
    corrupt = tmp_path / "corrupt"
    shutil.copytree(models["a"], corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not readable"):
        check_lora_adapter(corrupt, models["base"])
