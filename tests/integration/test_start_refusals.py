"""The refusal matrix: each kind of refusal at start, for every command the assembly
builds (server/assembly.py), exits 2 with a message that names what was refused (never
"engine failed to load"), and leaves no process behind, also when the refusal comes after
vLLM's engine-core process started (checked with psutil: every process that inherited
this run's marker is gone).

Local refusals: `serve` (a reference that does not load, a calibration measured on another
engine, a flag out of range), `reference` (a model that does not load, an adapter that
does not mount), `verify` (a reference that does not load) and the calibration child
(settings it cannot read).

Remote refusals, on a real `shadowserve reference` holding adapter `a` whose noise floor
runs in float16: its noise dtype (found before the engine when --dtype says it, after it
when --dtype auto resolves), another vocabulary, an adapter it does not hold (and may not
load), and an adapter it holds other weights of (both hashes named)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from adapters.lora_identity import adapter_sha256
from tests.candidates import lora_adapter, with_alpha
from tests.conftest import REFERENCE_TOKEN
from tests.servers import RunningServer, free_port, launch

pytestmark = pytest.mark.integration

MARK = "SHADOWSERVE_TEST_RUN"


@pytest.fixture(scope="module")
def adapters(demo_model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("refusal-adapters")
    a = lora_adapter(demo_model, root / "a", seed=1234)
    return {"a": a, "a_alpha": with_alpha(a, root / "a-alpha", 32)}


@pytest.fixture(scope="module")
def fp16_reference(demo_model, adapters, tmp_path_factory) -> RunningServer:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "reference", "--model", str(demo_model), "--port", str(port),
           "--tokens", REFERENCE_TOKEN, "--noise-dtype", "float16", "--lora-modules", f"a={adapters['a']}"]
    server = launch(cmd, port, tmp_path_factory.mktemp("refusal-reference") / "reference.log", api_key=REFERENCE_TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def other_vocab(demo_model, tmp_path_factory):
    """The demo model with two token ids exchanged in its tokenizer: same size, other ids."""
    other = tmp_path_factory.mktemp("vocab") / "other-vocab"
    shutil.copytree(demo_model, other, ignore=shutil.ignore_patterns("model.safetensors"))
    (other / "model.safetensors").symlink_to(demo_model / "model.safetensors")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    return other


def serve(args: list[str], reference: RunningServer, timeout: float = 300) -> tuple[subprocess.CompletedProcess, list]:
    """`shadowserve serve ARGS` on the reference until it exits; also the processes it left."""
    mark = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(free_port()), "--shadow-rate", "1",
           "--shadow-reference-url", reference.url, "--shadow-reference-token", REFERENCE_TOKEN, *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, MARK: mark})
    return run, left_behind(mark)


def left_behind(mark: str) -> list[psutil.Process]:
    left = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(MARK) == mark:
                left.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return left


CASES = {
    "noise dtype, before the engine": (
        lambda m, a, o: ["--model", str(m), "--engine", "transformers", "--dtype", "bfloat16"],
        ["the candidate is served in bfloat16, but the remote reference", "computes its noise floor in float16"]),
    "vocabulary": (
        lambda m, a, o: ["--model", str(o), "--engine", "transformers", "--shadow-noise-floor", "off"],
        ["does not share the candidate's tokenizer"]),
    "adapter not on the reference": (
        lambda m, a, o: ["--model", str(m), "--lora-modules", f"c={a['a']}", "--shadow-noise-floor", "off"],
        ["the adapter c is not on the remote reference", "does not allow run-time loads: mount it there"]),
    "adapter with other weights": (
        lambda m, a, o: ["--model", str(m), "--lora-modules", f"a={a['a_alpha']}", "--shadow-noise-floor", "off"],
        ["the adapter a: the remote reference", "holds other weights under that name"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_reference_that_does_not_fit_is_refused_before_the_engine(case, demo_model, adapters, other_vocab,
                                                                     fp16_reference):
    args, words = CASES[case]
    run, left = serve(args(demo_model, adapters, other_vocab), fp16_reference, timeout=180)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "shadowserve serve: the reference was refused: " in run.stderr, run.stderr[-3000:]
    assert "engine failed to load" not in run.stderr
    for word in words:
        assert word in run.stderr, run.stderr[-3000:]
    assert fp16_reference.url in run.stderr or "SmolLM2-135M-Instruct" in run.stderr  # the reference, named
    if case == "adapter with other weights":
        assert adapter_sha256(adapters["a"])[:12] in run.stderr and adapter_sha256(adapters["a_alpha"])[:12] in run.stderr
    assert "EngineCore" not in run.stdout + run.stderr and not left  # refused before any engine started


def test_a_refusal_after_vllm_started_shuts_the_engine_down_first(demo_model, fp16_reference):
    """--dtype auto: the serving dtype is known once vLLM resolved it, so the noise floor's
    dtype is checked after its engine-core process started; it must be gone at exit."""
    run, left = serve(["--model", str(demo_model), "--dtype", "auto", "--enforce-eager", "true", "--max-model-len", "512",
                       "--kv-cache-gib", "1"], fp16_reference)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "shadowserve serve: the reference was refused: the candidate is served in" in run.stderr, run.stderr[-3000:]
    assert f"but the remote reference {fp16_reference.url} computes its noise floor in float16" in run.stderr
    assert "engine failed to load" not in run.stderr
    logged = run.stdout + run.stderr  # vLLM logs to stdout
    assert "(EngineCore pid=" in logged and "[shutdown] MPClient: complete" in logged  # started, then ended
    assert not left, [(p.pid, p.name()) for p in left]


def run_marked(args: list[str], stdin: str | None = None, module: str = "server.cli",
               timeout: float = 300) -> tuple[subprocess.CompletedProcess, list]:
    """`python -m MODULE ARGS` until it exits, and the processes it left behind."""
    mark = uuid.uuid4().hex
    run = subprocess.run([sys.executable, "-m", module, *args], input=stdin, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, MARK: mark})
    return run, left_behind(mark)


@pytest.fixture(scope="module")
def foreign_calibration(demo_model, tmp_path_factory) -> Path:
    """A calibration measured on vLLM: refused by a server whose engine is transformers."""
    from shadow.calibration import Calibration, EngineFacts

    facts = EngineFacts(engine="vllm", engine_version="0.0.1", dtype="bfloat16", compile_mode="eager", device="cpu",
                        reference="SmolLM2-135M-Instruct")
    root = tmp_path_factory.mktemp("calibration")
    path = root / "vllm.json"
    (root / "no-weights").mkdir()  # a model directory without its weights, beside it (verify's case)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model / name, root / "no-weights" / name)
    Calibration(facts=facts, kl_ratio=1.0, kl_ratio_low=0.9, kl_ratio_high=1.1, top1_ratio=1.0, sequences=8, tokens=256,
                measured_at="2026-12-06T00:00:00Z").save(path)
    return path


MISSING = "/nonexistent/shadowserve-model"
LOCAL = {  # name: (the command's arguments, what it must say)
    "serve: a reference that does not load": (
        lambda m, cal: ["serve", "--model", str(m), "--engine", "transformers", "--port", str(free_port()),
                        "--shadow-rate", "1", "--shadow-reference-model", MISSING],
        ["shadowserve serve: the reference failed to load: ", MISSING]),
    "serve: a calibration measured on another engine": (
        lambda m, cal: ["serve", "--model", str(m), "--engine", "transformers", "--dtype", "bfloat16",
                        "--port", str(free_port()), "--shadow-rate", "1", "--verdict-calibration", str(cal)],
        ["shadowserve serve: ", "vllm.json", "'vllm'"]),
    "serve: a flag out of range": (
        lambda m, cal: ["serve", "--model", str(m), "--shadow-rate", "2"],
        ["shadowserve: invalid settings: ", "shadow_rate"]),
    "reference: a model that does not load": (
        lambda m, cal: ["reference", "--model", MISSING, "--port", str(free_port()), "--tokens", REFERENCE_TOKEN],
        ["shadowserve reference: ", MISSING]),
    "reference: an adapter that is not there": (  # refused as its flag is read
        lambda m, cal: ["reference", "--model", str(m), "--port", str(free_port()), "--tokens", REFERENCE_TOKEN,
                        "--lora-modules", f"x={MISSING}"],
        ["shadowserve: invalid settings: ", MISSING, "no LoRA adapter there"]),
    "verify: a reference without weights": (
        lambda m, cal: ["verify", str(m), str(cal.parent / "no-weights"), "--engine", "transformers"],
        ["shadowserve verify: ", "no-weights"]),
}


@pytest.mark.parametrize("case", list(LOCAL))
def test_each_refusal_at_start_exits_2_naming_what(case, demo_model, foreign_calibration):
    args, words = LOCAL[case]
    run, left = run_marked(args(demo_model, foreign_calibration))
    assert run.returncode == 2, run.stderr[-3000:]
    for word in words:
        assert word in run.stderr, run.stderr[-3000:]
    assert "engine failed to load" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert not left, [(p.pid, p.name()) for p in left]


def test_the_calibration_child_refuses_settings_it_cannot_read():
    run, left = run_marked([], stdin="{not json", module="server.verify.calibrate")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "bad calibration settings" in run.stdout, run.stdout[-3000:]  # one line on stdout, for the server
    assert not left
