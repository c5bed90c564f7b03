"""The tokenizer and template pass of `diagnose`, on real SmolLM2 files (copies edited the way
conversions break them) and on hand-built facts for the pure diff."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from adapters.diagnose.tokenizers import (
    SYSTEM,
    TokenizerFacts,
    diff_tokenizers,
    read_tokenizer_facts,
    tokenizer_pass,
)
from tests.candidates import (
    NON_WEIGHT_FILES,
    cast_weights,
    template_without_system,
    wrong_generation_eos,
)


@pytest.fixture(scope="module")
def reference(demo_model: Path) -> TokenizerFacts:
    return read_tokenizer_facts(demo_model)


def copy_of(demo: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    """The demo model's files, less `drop`, with the weights symlinked."""
    dst.mkdir(parents=True)
    for name in NON_WEIGHT_FILES:
        if name not in drop:
            shutil.copy2(demo / name, dst / name)
    (dst / "model.safetensors").symlink_to(demo / "model.safetensors")
    return dst


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def swap_token_ids(model_dir: Path, a: str, b: str) -> None:
    """Two added tokens exchange their ids in tokenizer.json (added_tokens and model.vocab)."""
    def change(data):
        ids = {t["content"]: t["id"] for t in data["added_tokens"]}
        for token in data["added_tokens"]:
            if token["content"] in (a, b):
                token["id"] = ids[b if token["content"] == a else a]
        data["added_tokens"].sort(key=lambda t: t["id"])
        vocab = data["model"]["vocab"]
        vocab[a], vocab[b] = vocab[b], vocab[a]
    edit_json(model_dir / "tokenizer.json", change)


# Real files


def test_controls_give_nothing(demo_model, reference, tmp_path):
    assert diff_tokenizers(reference, reference) == []
    assert tokenizer_pass(demo_model, demo_model) == []
    cast = cast_weights(demo_model, tmp_path / "bf16", torch.bfloat16)  # only the weights (and config dtype) differ
    assert tokenizer_pass(cast, demo_model) == []


def test_wrong_generation_eos(demo_model, reference, tmp_path):
    found = diff_tokenizers(read_tokenizer_facts(wrong_generation_eos(demo_model, tmp_path / "c")), reference)
    first = found[0]
    assert first.field == "generation_config.eos_token_id"
    assert (first.file, first.forward) == ("generation_config.json", True)
    assert first.candidate == "0 ('<|endoftext|>')" and first.reference == "2 ('<|im_end|>')"
    assert "runs past the end of the turn" in first.consequence and "'<|im_end|>'" in first.consequence
    assert len(found) == 1  # the per-source difference and the end-of-turn check read as one line


def test_template_without_system_turn(demo_model, reference, tmp_path):
    found = diff_tokenizers(read_tokenizer_facts(template_without_system(demo_model, tmp_path / "c")), reference)
    first = found[0]
    assert (first.field, first.file, first.forward) == ("chat_template", "chat template", True)
    assert "drops the system turn" in first.consequence
    assert "<|im_start|>user" in first.candidate and "<|im_start|>system" in first.reference
    assert len(found) == 1


def test_added_tokens_exchanged(demo_model, reference, tmp_path):
    cand = copy_of(demo_model, tmp_path / "c")
    swap_token_ids(cand, "<repo_name>", "<reponame>")
    found = diff_tokenizers(read_tokenizer_facts(cand), reference)
    assert [d.field for d in found] == ["added_tokens"]  # not repeated as a vocabulary difference
    assert found[0].candidate == "'<repo_name>' 4, '<reponame>' 3"
    assert found[0].reference == "'<repo_name>' 3, '<reponame>' 4"
    assert found[0].forward


def test_chat_tokens_exchanged(demo_model, reference, tmp_path):
    """<|im_start|> and <|im_end|> exchange ids: the rendered prompt is the same text but other
    ids, and the stop id 2 is now <|im_start|>."""
    cand = copy_of(demo_model, tmp_path / "c")
    swap_token_ids(cand, "<|im_start|>", "<|im_end|>")
    found = {d.field: d for d in diff_tokenizers(read_tokenizer_facts(cand), reference)}
    assert next(iter(found)) == "added_tokens"
    assert found["end_of_turn"].forward and "'<|im_end|>'" in found["end_of_turn"].consequence
    assert found["end_of_turn"].candidate == "stops on [2 ('<|im_start|>')]"
    assert found["chat_template.ids"].candidate == "token 0: 2 ('<|im_start|>')"
    assert found["chat_template.ids"].reference == "token 0: 1 ('<|im_start|>')"
    assert found["tokenizer.eos_token"].candidate == "1 ('<|im_end|>')"


def test_tokenizer_eos_changed(demo_model, reference, tmp_path):
    cand = copy_of(demo_model, tmp_path / "c")
    edit_json(cand / "tokenizer_config.json", lambda d: d.update(eos_token="<|endoftext|>"))
    found = diff_tokenizers(read_tokenizer_facts(cand), reference)
    assert [(d.field, d.file, d.forward) for d in found] == [("tokenizer.eos_token", "tokenizer", True)]
    assert (found[0].candidate, found[0].reference) == ("0 ('<|endoftext|>')", "2 ('<|im_end|>')")


def test_candidate_without_chat_template(demo_model, reference, tmp_path):
    cand = copy_of(demo_model, tmp_path / "c", drop=("chat_template.jinja",))
    found = diff_tokenizers(read_tokenizer_facts(cand), reference)
    assert [(d.field, d.candidate, d.forward) for d in found] == [("chat_template", "no chat template", True)]
    assert "candidate has no chat template" in found[0].consequence


def test_template_that_raises_on_system(demo_model, reference, tmp_path):
    cand = copy_of(demo_model, tmp_path / "c")
    refuse = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    (cand / "chat_template.jinja").write_text(refuse + (demo_model / "chat_template.jinja").read_text())
    found = diff_tokenizers(read_tokenizer_facts(cand), reference)
    assert [d.field for d in found] == ["chat_template"]
    assert found[0].candidate == "raised TemplateError: System role not supported"
    assert "candidate's template raises" in found[0].consequence
    # The end-of-turn token is still found, on the conversation without its system turn.
    assert read_tokenizer_facts(cand).end_of_turn == ("<|im_end|>", 2)


def test_side_without_tokenizer(demo_model, reference, tmp_path):
    tokenizer = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    bare = copy_of(demo_model, tmp_path / "bare", drop=tokenizer)
    found = diff_tokenizers(read_tokenizer_facts(bare), reference)
    assert [(d.field, d.file, d.forward) for d in found] == [("tokenizer", "tokenizer", False)]
    assert found[0].consequence == "tokenizer not compared: candidate: no tokenizer files"
    assert tokenizer_pass(bare, bare) == []


def test_tokenizer_that_needs_remote_code(demo_model, reference, tmp_path):
    """InternLM2's original ships its tokenizer as remote code (auto_map), which is not run."""
    cand = copy_of(demo_model, tmp_path / "c", drop=("tokenizer.json",))
    edit_json(cand / "tokenizer_config.json", lambda d: d.update(
        tokenizer_class="InternLM2Tokenizer",
        auto_map={"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}))
    (cand / "tokenizer.model").write_bytes(b"")
    found = tokenizer_pass(demo_model, cand)
    assert [(d.field, d.forward) for d in found] == [("tokenizer", False)]
    assert found[0].consequence.startswith("tokenizer not compared: reference: it needs remote code")


# The pure diff, on hand-built facts

VOCAB = {"<s>": 0, "</s>": 1, "<|im_end|>": 2, "a": 3, "b": 4, "c": 5}


def facts(**changes) -> TokenizerFacts:
    ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None}
    base = {"config": ids, "generation": ids, "vocab": dict(VOCAB),
            "added": {0: ("<s>", True), 1: ("</s>", True), 2: ("<|im_end|>", True)},
            "specials": {"bos": ("<s>", 0), "eos": ("</s>", 1), "pad": None}}
    return TokenizerFacts(**{**base, **changes})


def test_vocabulary_reordered():
    cand = facts(vocab={**VOCAB, "b": 5, "c": 4})
    found = diff_tokenizers(cand, facts())
    assert [d.field for d in found] == ["vocab"]
    moved = "2 tokens at other ids, reference → candidate: 'b': 4 → 5, 'c': 5 → 4; the ids moved"
    assert moved in found[0].consequence


def test_vocabulary_with_tokens_on_one_side():
    found = diff_tokenizers(facts(vocab={**VOCAB, "d": 6}), facts())
    assert found[0].field == "vocab"
    assert (found[0].candidate, found[0].reference) == ("7 tokens; 1 only here: 'd'", "6 tokens")


def test_generation_eos_without_the_end_of_turn_token():
    """The InternLM2 trap: eos_token_id 2 ('</s>') where the chat ends turns with <|im_end|>;
    the tokenizer's EOS is '</s>' too, so vLLM runs on as well."""
    vocab = {"</s>": 2, "<|im_end|>": 92542}
    ref = facts(vocab=vocab, generation={"eos_token_id": [2, 92542]}, end_of_turn=("<|im_end|>", 92542),
                specials={"eos": ("</s>", 2)}, added={})
    cand = facts(vocab=vocab, generation={"eos_token_id": 2}, specials={"eos": ("</s>", 2)}, added={})
    found = diff_tokenizers(cand, ref)
    assert [d.field for d in found] == ["generation_config.eos_token_id"]
    assert found[0].candidate == "2 ('</s>')" and found[0].reference == "[2 ('</s>'), 92542 ('<|im_end|>')]"
    assert found[0].consequence.startswith("generation runs past the end of the turn")
    assert "neither in generation_config.json's eos_token_id nor the tokenizer's EOS" in found[0].consequence


def test_end_of_turn_from_config_when_no_generation_config():
    """Without generation_config.json on either side the stop set is config.json's; its plain
    difference is the config pass's, but the end of turn it loses is this pass's."""
    ref = facts(generation=None, config={"eos_token_id": 2}, end_of_turn=("<|im_end|>", 2))
    cand = facts(generation=None, config={"eos_token_id": 1})
    found = diff_tokenizers(cand, ref)
    assert [(d.field, d.file) for d in found] == [("end_of_turn", "generation_config.json")]
    assert "config.json's (no generation_config.json)" in found[0].consequence
    assert diff_tokenizers(facts(generation=None, config={"pad_token_id": 5}), facts(generation=None)) == []


def test_informational_differences():
    found = diff_tokenizers(facts(generation={"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}, added={
        0: ("<s>", True), 1: ("</s>", True), 2: ("<|im_end|>", False)}), facts())
    assert [(d.field, d.forward) for d in found] == [("added_tokens.special", False),
                                                    ("generation_config.pad_token_id", False)]
    assert found[1].candidate == "2 ('<|im_end|>')" and found[1].reference == "none"


def test_generation_prompt_missing():
    ref = facts(has_template=True, rendering=f"<sys>{SYSTEM}</sys><user>hi</user><assistant>",
                generation_prompt="<assistant>")
    cand = facts(has_template=True, rendering=f"<sys>{SYSTEM}</sys><user>hi</user>", generation_prompt="")
    found = diff_tokenizers(cand, ref)
    assert [d.field for d in found] == ["chat_template"]
    assert "does not add the generation prompt '<assistant>'" in found[0].consequence
    assert found[0].candidate.startswith(f"at character {len(ref.rendering) - len('<assistant>')}: ")


def test_neither_side_has_a_tokenizer():
    bare = facts(has_files=False, error="no tokenizer files", vocab={}, added={}, specials={})
    assert diff_tokenizers(bare, bare) == []
