"""Beyond Llama: tiny Gemma-2, Qwen2 and Mistral models (tests/architectures.py: the real
SmolLM2 tokenizer and vocabulary, two layers, peaked predictions) through vLLM and the
product, each with its bf16 control (the reference's own fp32 weights served in bf16) and
one bug of its own kind.

- `verify --calibrate` (the real CLI, vLLM, --json) on the Gemma-2 and Qwen2 bugs: one
  run judges both. Its calibration step is the control: the ordinary verify pipeline on
  the reference's weights through the same vLLM engine in bf16, over the same prompts; its
  KL ratio to the transformers noise floor must sit inside the verdict's limit (the
  interval's upper end under 2x). Then the bug fails, and verify's structure findings name
  the config fields or the tensors. One engine start saved per architecture (the suite's
  time is a budget too).
- `verify` on the Mistral bug (fails, `sliding_window` named), and `serve` with the shadow
  on the Mistral control: the live verdict passes. Mistral's control is the one served
  live because its serving path matters most: vLLM applies the 16-token window at every
  decode step, on prompts longer than the window.
- `diagnose` (all three passes) on the Qwen2 and Mistral bugs: named, and the activation
  pass places the first departure in layer 0's attention.

Time: vLLM's start dominates (the models run in milliseconds), so each run is short: 8
sequences of 32 tokens, the verdict's minimum. `verify` runs with vLLM's engine core
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the same kernels and numbers (the Qwen2
control read the same KL ratio to 16 digits both ways) without two process starts per
engine (~25 s each on the 2-core test machine). `serve` runs as users run it.

The bug runs skip the reference's self-check (--verdict-reference-check false): it scores
a natural-text probe on both sides and refuses a reference far worse than its candidate,
which assumes trained models. These are random ones: both sides' probe perplexity is
~1e13, and the zeroed Qwen2 biases happen to make it 0.45 nats/token *lower*.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.verify.inputs import BUILTIN_PROMPTS
from tests import architectures
from tests.conftest import MODEL_NAME
from tests.servers import start_server

pytestmark = pytest.mark.integration

VLLM = ["--enforce-eager", "true", "--max-model-len", "2048", "--kv-cache-gib", "1"]
SIZE = (8, 32)  # prompts, tokens: the verdict's minimum
# What each bug's structure findings must name (kind, or the tensors of a weights finding).
NAMED = {
    "gemma2": {"query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"},
    "qwen2": {f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(architectures.LAYERS) for p in "qkv"},
    "mistral": {"sliding_window"},
}
FIGURES: dict[str, str] = {}  # printed at the end: what each case read


@pytest.fixture(scope="module")
def pairs(demo_model, tmp_path_factory) -> dict[str, architectures.Pair]:
    root = tmp_path_factory.mktemp("architectures")
    return {arch: architectures.build(arch, demo_model, root) for arch in architectures.CONFIGS}


@pytest.fixture(scope="module", autouse=True)
def print_figures():
    yield
    if FIGURES:
        print("\n\ncase | where | verdict | KL ratio [95% CS] | decided after (sequences) | named")
        for case, row in FIGURES.items():
            print(f"{case} | {row}")


def _figures(report: dict, named: str) -> str:
    verdict, kl = report["verdict"], report["verdict"]["kl_ratio"]
    bound = [("unbounded" if b is None else f"{b:.3g}") for b in (kl["low"], kl["high"])] if kl else ["-", "-"]
    first = next((p["sequences"] for p in report.get("trajectory", []) if p["status"] != "inconclusive"), "never")
    ratio = f"{kl['estimate']:.3g} [{bound[0]}, {bound[1]}]" if kl else "-"
    return f"{verdict['status']} | {ratio} | {first} | {named or '-'}"


def verify(candidate: Path, reference: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    prompts, tokens = SIZE
    run = subprocess.run(
        [sys.executable, "-m", "server.cli", "verify", str(candidate), str(reference), "--dtype", "bfloat16",
         "--samples", str(prompts), "--max-tokens", str(tokens), "--kv-cache-gib", "1", "--max-model-len", "2048",
         "--json", "--strict", *extra],
        capture_output=True, text=True, timeout=900, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert run.returncode in (0, 1, 3), run.stderr[-3000:]
    return run, json.loads(run.stdout)


def names(findings: list[dict]) -> set[str]:
    """What the findings name: config fields (their kind) and departing tensors."""
    return {f["kind"] for f in findings if f["source"] == "config"} | {t for f in findings for t in f["tensors"]}


CALIBRATED = ("gemma2", "qwen2")  # their control is the calibration step of the bug's run


@pytest.mark.parametrize("arch", ["gemma2", "qwen2", "mistral"])
def test_verify_fails_the_architecture_bug_and_names_it(arch, pairs, tmp_path):
    pair = pairs[arch]
    calibration = tmp_path / "calibration.json"
    extra = ["--calibrate", "--verdict-calibration", str(calibration)] if arch in CALIBRATED else []
    run, report = verify(pair.bug, pair.reference, "--verdict-reference-check", "false", *extra)
    if arch in CALIBRATED:
        # The control: vLLM serves the architecture as transformers' fp32 reference computes it, up to bf16.
        control = json.loads(calibration.read_text())
        FIGURES[f"{arch} control"] = (f"verify --calibrate | (calibration) | {control['kl_ratio']:.3g} "
                                      f"[{control['kl_ratio_low']:.3g}, {control['kl_ratio_high']:.3g}] | "
                                      f"{control['sequences']} | - (top-1 flips {control['top1_ratio']:.3g}x the floor's)")
        assert control["facts"]["engine"] == "vllm" and control["sequences"] == SIZE[0], control
        assert control["kl_ratio_high"] < 2.0, control  # inside the verdict's KL limit (2x)
        assert report["verdict"]["floor"]["kind"] == "calibrated"
    diagnosis = report["diagnosis"]
    named = names(diagnosis["findings"])
    FIGURES[f"{arch} bug"] = "verify | " + _figures(report, ", ".join(sorted(named)))
    verdict = report["verdict"]
    assert run.returncode == 1 and verdict["status"] == "fail", (verdict["reasons"], run.stderr[-2000:])
    assert verdict["different"] is True
    assert diagnosis["ran"] and diagnosis["departs"] and named == NAMED[arch], diagnosis["findings"]


def chat(url: str, prompt: str, tokens: int) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    assert reply.status_code == 200, reply.text


def test_serve_with_the_shadow_passes_the_mistral_control(pairs, tmp_path):
    """The reference's weights served in bf16 behind `serve`, every request shadowed: the
    live verdict passes (vLLM applies the 16-token window at each decode step as the fp32
    reference does over the whole sequence)."""
    reference = pairs["mistral"].reference
    prompts, tokens = SIZE
    server = start_server(["--model", str(reference), "--served-model-name", MODEL_NAME, "--dtype", "bfloat16", *VLLM,
                           "--shadow-rate", "1.0", "--shadow-reference-model", str(reference)], tmp_path / "server.log")
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: chat(server.url, p, tokens), BUILTIN_PROMPTS[:prompts]))
        deadline = time.monotonic() + 300
        while (report := httpx.get(f"{server.url}/v1/shadow/verdict", params={"trajectory": "true"}, timeout=60).json()) \
                and (report["candidate"] or {}).get("sequences", 0) < prompts:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.5)
    finally:
        server.stop()
    FIGURES["mistral control"] = "serve | " + _figures(report, "")
    verdict = report["verdict"]
    assert verdict["status"] == "pass" and verdict["different"] is False, verdict["reasons"]
    # prompts and answers ran past the window: the window was in play on both sides
    assert report["candidate"]["tokens"] >= prompts * tokens * 0.9, report["candidate"]


@pytest.mark.parametrize("arch, first", [("qwen2", "weights"), ("mistral", "config")])
def test_diagnose_names_the_bug_and_where_it_departs(arch, first, pairs):
    """diagnose's three passes, in-process (the CLI's code path less its ~10 s start)."""
    from adapters.diagnose.run import diagnose

    pair = pairs[arch]
    report = diagnose(pair.bug, pair.reference, progress=False)
    assert report.departs and names([f.model_dump() for f in report.findings]) == NAMED[arch], report.findings
    top = report.findings[0]
    assert top.source == first and "first departure: layer 0, self-attention output" in top.summary, top
    if arch == "qwen2":  # the biases are named for what they are: written as zeros
        assert top.kind == "zeroed" and "all zeros where the reference is not" in top.summary, top
