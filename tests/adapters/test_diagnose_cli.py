"""`shadowserve diagnose` as a user runs it: exit codes, the text report, --json, and the
HTML page opened in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests import candidates
from tests.browser import screenshot


def diagnose(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "diagnose", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def broken(demo_model, tmp_path_factory):
    return candidates.attention_scale(demo_model, tmp_path_factory.mktemp("cli") / "attention_scale")


def test_the_attention_scale_case_end_to_end_with_an_html_report(broken, demo_model, tmp_path):
    page = tmp_path / "diagnose.html"
    run = diagnose(broken, demo_model, "--device", "cpu", "--html", page)
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "DEPARTS: 1 finding (exit 1)" in lines
    first = lines[lines.index("Findings, most likely cause first:") + 1]
    assert first.startswith("  1. [weights] q_proj in all 30 layers = 1.0695 × reference (≈ √256/√224 = 16/14.97")
    assert "first departure: layer 0, self-attention output" in first
    assert "  layers.*.self_attn.q_proj in all 30 layers: scaled: 1.0695 × reference (≈ √256/√224)" in lines
    assert any(line.startswith("wall time: config") for line in lines)

    text = page.read_text()
    assert text.count("<svg") == 1 and "<script" not in text and "DEPARTS" in text
    shot = tmp_path / "diagnose.png"
    console = screenshot(page, shot, "1300,2400")
    assert console == [], console


def test_a_precision_control_exits_0_with_json(demo_model, tmp_path):
    control = candidates.cast_weights(demo_model, tmp_path / "bf16", torch.bfloat16)
    run = diagnose(control, demo_model, "--only", "config,weights", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["departs"] is False and report["findings"] == [] and report["passes"] == ["config", "weights"]
    assert report["weight_counts"] == {"rounding": 272} and report["activations"] is None


def test_an_untied_head_equal_to_the_embedding_is_information_not_a_finding(demo_model, tmp_path):
    """Issue 35: `tie_word_embeddings: false` with lm_head.weight = the embedding in bf16 (a
    common, correct export) against the tied demo model exits 0; the difference is listed."""
    untied = candidates.untied_head(demo_model, tmp_path / "untied")
    run = diagnose(untied, demo_model, "--only", "config,weights")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert "nothing departs beyond dtype rounding and the noise envelope (exit 0)" in lines
    assert ("  tie_word_embeddings (info): candidate False vs reference True — the candidate writes its output head "
            "out as its own tensor (lm_head.weight), equal to the reference's tied embedding up to one bfloat16 "
            "rounding: the same output head") in lines
    assert "Weights: 273 reference tensors: identical 272, rounding 1" in lines


def test_a_cast_through_float16_is_named_as_one(demo_model, tmp_path):
    twice = candidates.cast_twice(demo_model, tmp_path / "twice")
    run = diagnose(twice, demo_model, "--only", "config,weights")
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    first = lines[lines.index("Findings, most likely cause first:") + 1]
    assert first.startswith("  1. [weights] embed_tokens and q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                            "down_proj in all 30 layers: cast through float16, then bfloat16: ")
    assert first.endswith("each the bfloat16 rounding of its float16 rounding: a double cast (precision only; no "
                          "arithmetic in low precision)") and "merge" not in run.stdout
    assert "Weights: 272 reference tensors: cast_twice 211, rounding 61" in lines


@pytest.mark.parametrize("args, message", [
    (["{tmp}/absent", "{demo}"], "not a Hugging Face model directory"),
    (["{demo}", "{demo}", "--mapping", "internlm2"], "the reference's model_type is 'llama', not 'internlm2'"),
    (["{demo}", "{demo}", "--adapter", "{tmp}", "--only", "weights"], "not a PEFT adapter"),
    (["{demo}", "{demo}", "--only", "everything"], "Input should be 'config', 'weights' or 'activations'"),
])
def test_usage_and_load_errors_exit_2_with_a_message(demo_model, tmp_path, args, message):
    run = diagnose(*(a.format(tmp=tmp_path, demo=demo_model) for a in args))
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
