"""The verdict on broken and healthy candidates built from SmolLM2 (tests/candidates.py),
both ways it is given: offline by `shadowserve verify` (the real CLI, vLLM engine, exit
code and --json) and live by a server's `GET /v1/shadow/verdict` after real traffic.

Every bug must fail, every precision-only control must pass, and the first decision the
verdict takes (replayed in arrival order: `trajectory`) must be the right one and must
never be reversed afterwards. Arrival order is not fixed (requests complete
concurrently), and with 8-10 sequences a control's excess top-1 estimate can sit at its
limit: replaying the controls' recorded sequences in 200-300 random orders, a `pass`
fell back to `inconclusive` for a sequence or two in 7-12% of orders (never to `fail`),
so a fall-back is allowed and shown in the table, a reversal is not. Bugs are judged on 10 prompts x 48 tokens, controls on 16 x 64
(the issue's budget is 32 x 64): a bug is obvious sooner, a pass needs a tighter interval.
(The rotary-layout bug ends most answers after a few tokens, 2.5-6 compared tokens per
sequence depending on the CPU: it is judged on 24 prompts, so that the verdict's minimum
of 32 tokens is reached on either.)
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
from tests.candidates import BUGS, CONTROLS, Candidate, build
from tests.conftest import MODEL_NAME
from tests.servers import RunningServer, start_server

pytestmark = pytest.mark.integration

VLLM = ["--enforce-eager", "true", "--max-model-len", "2048", "--kv-cache-gib", "1"]
# verify runs vLLM's engine core in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the
# same kernels and figures (tests/integration/test_architectures.py), one process start less.
IN_PROCESS = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
SIZE = {"bug": (10, 48), "control": (16, 64), "mild": (16, 48)}  # prompts, tokens
# The rotary-layout bug ends its answers after a few tokens, how few depends on the CPU's
# kernels: ~6 per answer on an AMD EPYC, 2.5 on an Intel Xeon (both AVX512-BF16), where 10
# prompts gave 25 tokens, under the verdict's 32-token minimum. 24 prompts leave room.
PROMPTS = {"rotary_layout": 24}
# Its answers run from 1 token to the limit, so the per-sequence KL's spread is mostly the
# answers' lengths: at 48 tokens the KL contrast at the limit was still undecided after 24
# sequences (6.4 nats per sequence, 95 % CS -3.0 to 15.9; fail by the hard guard alone);
# at 16 it is decided (2.5, CS 0.44 to 4.6), on the contrast, the ratio's interval being
# unbounded above.
TOKENS = {"rotary_layout": 16}
EXPECTED = {"bug": ("fail", 1), "control": ("pass", 0)}
TABLE: dict[str, dict] = {}  # name -> verify's and the live server's figures, printed at the end


@pytest.fixture(scope="module")
def candidates_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("candidates")


@pytest.fixture(scope="module", autouse=True)
def print_table():
    yield
    if TABLE:
        print("\n\ncandidate | kind | where | verdict | KL ratio [95% CI] | excess top-1 (pts) | hard cand/noise | "
              "decided after (sequences) | fell back to inconclusive (points)")
        for name, rows in TABLE.items():
            for where, row in rows.items():
                print(f"{name} | {row['kind']} | {where} | {row['status']} | {row['kl_ratio']} | {row['top1']} | "
                      f"{row['hard']} | {row['decided']} | {row['fell back']}")


def bound(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.3g}"


def check(report: dict, c: Candidate, where: str) -> None:
    """The verdict is right, taken at the first decision, and never reversed after it."""
    verdict = report["verdict"]
    want = EXPECTED[c.kind][0]
    points = report["trajectory"]
    first = next((p for p in points if p["status"] != "inconclusive"), None)
    kl, top1 = verdict["kl_ratio"], verdict["excess_top1"]
    TABLE.setdefault(c.name, {})[where] = {
        "kind": c.kind, "status": verdict["status"],
        "kl_ratio": f"{kl['estimate']:.3g} [{bound(kl['low'])}, {bound(kl['high'])}]" if kl else "-",
        "top1": f"{100 * top1['estimate']:.2f}" if top1 else "-",
        "hard": f"{report['candidate']['hard']}/{report['noise_floor']['hard']} of {report['candidate']['sequences']}"
                f" ({report['candidate']['tokens']} tokens)",
        "decided": first["sequences"] if first else "never",
        "fell back": sum(p["status"] == "inconclusive" for p in points if first and p["sequences"] > first["sequences"]),
    }
    assert verdict["status"] == want, (c.name, where, verdict["reasons"])
    assert first is not None and first["status"] == want, (c.name, where, points)
    after = {p["status"] for p in points if p["sequences"] >= first["sequences"]}
    assert after <= {want, "inconclusive"}, f"{c.name} ({where}): the verdict reversed itself: {points}"
    if c.name in ("bf16", "fp16"):
        # The noise floor reproduces the real serving noise of vLLM in that dtype.
        assert 1 / 3 <= kl["estimate"] <= 3, kl


def verify_args(c: Candidate) -> list[str]:
    prompts, tokens = PROMPTS.get(c.name, SIZE[c.kind][0]), TOKENS.get(c.name, SIZE[c.kind][1])
    args = [str(c.path), str(c.reference), "--dtype", c.dtype, "--samples", str(prompts), "--max-tokens", str(tokens),
            "--kv-cache-gib", "1", "--max-model-len", "2048", "--json"]
    return args + (["--adapter", str(c.adapter)] if c.adapter else [])


@pytest.mark.parametrize("name", [*BUGS, *CONTROLS])
def test_verify(name, demo_model, candidates_root, tmp_path):
    c = build(name, demo_model, candidates_root)
    strict = ["--strict"] if c.kind == "control" else []  # a control is not detectably different either
    run = subprocess.run([sys.executable, "-m", "server.cli", "verify", *verify_args(c), *strict],
                         capture_output=True, text=True, timeout=900, env=IN_PROCESS)
    (tmp_path / "verify.err").write_text(run.stderr)
    assert run.returncode in (0, 1, 3), run.stderr[-3000:]
    report = json.loads(run.stdout)
    check(report, c, "verify")
    assert run.returncode == EXPECTED[c.kind][1]
    assert report["verdict"]["different"] is (c.kind == "bug"), report["verdict"]["reasons"]
    assert report["verdict"]["floor"]["kind"] == "transformers"
    if c.kind == "bug":
        # every bug fails on KL itself, decided on the contrast: the rotary-layout bug's
        # noise floor is heavy-tailed (garbage continuations) and its ratio's interval
        # unbounded, where verdict v2 left KL undecided and failed it only by the hard guard
        assert report["verdict"]["checks"]["kl_ratio"] == "fail", report["verdict"]["reasons"]
        contrast = report["verdict"]["contrasts"]["kl_ratio"]
        assert contrast["low"] is not None and contrast["low"] > 0, contrast
    # diagnose's config and weight passes ran beside the verdict: every bug is named there, no control is
    diagnosis = report["diagnosis"]
    assert diagnosis["ran"] and bool(diagnosis["findings"]) is (c.kind == "bug"), diagnosis["findings"]


@pytest.fixture(scope="module")
def mild_run(demo_model, candidates_root, tmp_path_factory):
    """Attention logits x 1.03 (served bf16), judged after `--calibrate` measured the
    engine's own noise on the reference's weights (both in this one run)."""
    c = build("attention_scale_mild", demo_model, candidates_root)
    calibration = tmp_path_factory.mktemp("calibration") / "vllm-bf16-eager.json"
    run = subprocess.run([sys.executable, "-m", "server.cli", "verify", *verify_args(c), "--strict", "--calibrate",
                          "--verdict-calibration", str(calibration)], capture_output=True, text=True, timeout=900,
                         env=IN_PROCESS)
    return c, calibration, run


def test_verify_strict_fails_a_mild_bug_the_tolerance_lets_through(mild_run):
    """About 1.8x the noise floor's KL, inside the 2x tolerance, but a conversion should be
    exact up to rounding: detectably different, and `--strict` exits 1 on it."""
    c, calibration, run = mild_run
    assert run.returncode == 1, run.stderr[-3000:]
    verdict = json.loads(run.stdout)["verdict"]
    assert verdict["different"] is True and verdict["status"] != "fail", verdict["reasons"]
    assert verdict["kl_ratio"]["low"] > 1.0 and verdict["kl_ratio"]["high"] is not None
    assert "--strict: the candidate is detectably different" in run.stderr


def test_calibrate_measures_the_engine_and_the_verdict_says_which_floor(mild_run, demo_model):
    c, calibration, run = mild_run
    written = json.loads(calibration.read_text())
    assert written["facts"] == {"engine": "vllm", "engine_version": written["facts"]["engine_version"], "dtype": "bfloat16",
                                "compile_mode": "eager", "device": "cpu", "reference": demo_model.name}
    # The reference's weights through vLLM eager bf16 read about the transformers floor's noise.
    assert written["kl_ratio_low"] < written["kl_ratio"] < written["kl_ratio_high"] and 0.5 < written["kl_ratio"] < 2
    assert written["sequences"] == SIZE["mild"][0]
    floor = json.loads(run.stdout)["verdict"]["floor"]
    assert floor["kind"] == "calibrated" and floor["kl_scale"] == pytest.approx(written["kl_ratio"])
    assert "engine calibration written to" in run.stderr


def test_a_calibration_from_another_setup_is_refused(mild_run, demo_model):
    c, calibration, _ = mild_run
    run = subprocess.run([sys.executable, "-m", "server.cli", "verify", str(demo_model), str(demo_model), "--dtype", "float16",
                          "--samples", "8", "--max-tokens", "8", "--kv-cache-gib", "1", "--max-model-len", "2048",
                          "--verdict-calibration", str(calibration)], capture_output=True, text=True, timeout=900,
                         env=IN_PROCESS)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "CalibrationError" in run.stderr and "this run has dtype 'float16' (the calibration's: 'bfloat16')" in run.stderr


def chat(server: RunningServer, prompt: str, tokens: int) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers, timeout=600)
    assert reply.status_code == 200, reply.text


# Live, on the serving path: every control (the noise floor must match vLLM's real serving
# noise, adapter reference included) and the adapter bug. The five weight bugs differ from
# these only in the weights, which the same verdict code judges in test_verify above; each
# live case costs an engine start and its traffic (~75 s here), and the suite's time is a
# budget too.
LIVE = ("lora_bf16_merge_fp16", *CONTROLS)


# `serve --verdict-calibrate` on two of them: the bf16 control is judged against the floor
# its server measured at start (the reference's weights through the same vLLM engine, dtype
# and compile mode); the LoRA control's reference (base + unmerged adapter) cannot be served
# as it is, so its server says so and keeps the transformers floor.
CALIBRATED = {"bf16": "calibrated", "lora_fp32_merge_bf16": "transformers"}


@pytest.mark.parametrize("name", LIVE)
def test_live_verdict(name, demo_model, candidates_root, tmp_path):
    c = build(name, demo_model, candidates_root)
    prompts, tokens = SIZE[c.kind]
    args = ["--model", str(c.path), "--served-model-name", MODEL_NAME, "--dtype", c.dtype, *VLLM,
            "--shadow-rate", "1.0", "--shadow-reference-model", str(c.reference)]
    calibration = tmp_path / "calibration.json"
    if name in CALIBRATED:
        args += ["--verdict-calibrate", "true", "--verdict-calibration", str(calibration),
                 "--verdict-calibrate-samples", "16"]
    server = start_server(args + (["--shadow-reference-adapter", str(c.adapter)] if c.adapter else []),
                          tmp_path / "server.log", timeout=600 if name in CALIBRATED else 300)
    try:
        early = httpx.get(f"{server.url}/v1/shadow/verdict", timeout=30).json()
        assert early["verdict"]["status"] == "inconclusive" and early["candidate"] is None
        with ThreadPoolExecutor(prompts) as pool:  # concurrent, as live traffic is
            list(pool.map(lambda p: chat(server, p, tokens), BUILTIN_PROMPTS[:prompts]))
        deadline = time.monotonic() + 600
        while (report := httpx.get(f"{server.url}/v1/shadow/verdict", params={"trajectory": "true"}, timeout=60).json()) \
                and (report["candidate"] or {}).get("sequences", 0) < prompts:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(1)
    finally:
        server.stop()
    check(report, c, "live")
    log = server.log_path.read_text(errors="replace")
    floor = report["verdict"]["floor"]
    assert floor["kind"] == CALIBRATED.get(name, "transformers"), floor
    if floor["kind"] == "calibrated":
        written = json.loads(calibration.read_text())
        assert written["facts"]["compile_mode"] == "eager" and written["sequences"] == 16
        assert floor["kl_scale"] == pytest.approx(written["kl_ratio"])
        assert "engine calibration written to" in log
    elif name in CALIBRATED:
        assert not calibration.exists() and "not calibrated: the reference is a base model with an unmerged adapter" in log
