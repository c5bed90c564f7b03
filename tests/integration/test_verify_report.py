"""`shadowserve verify` with the transformers engine (fast, fp32): llama.cpp's corpus mode
on a broken and an exact candidate, the text report's layout, and the HTML report opened
in a real headless browser (Debian's chromium): a screenshot, no console errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.browser import screenshot
from tests.candidates import attention_scale, q_scaled_one_layer
from tests.verify_cli import CORPUS, FAST
from tests.verify_cli import run_verify as verify

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "rome.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="module")
def broken(demo_model, tmp_path_factory) -> Path:
    return attention_scale(demo_model, tmp_path_factory.mktemp("cand") / "attention_scale")


def test_corpus_mode_fails_a_broken_candidate(broken, demo_model, corpus):
    """Both sides teacher-forced over fixed text: the TransformerLens scale bug in fp32,
    where the noise floor is exactly 0, stands far above the floor."""
    run = verify(str(broken), str(demo_model), "--corpus", str(corpus), *FAST, "--json")
    assert run.returncode == 1, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["verdict"]["status"] == "fail" and report["noise_dtype"] == "float32"
    assert report["noise_floor"]["kl"]["mean"] == 0.0 and report["noise_floor"]["identical"] == 8
    assert report["candidate"]["sequences"] == 8 and report["candidate"]["tokens"] == 8 * 64
    assert "ratio is taken against that floor" in " ".join(report["verdict"]["reasons"])
    assert f"where and why: shadowserve diagnose {broken} {demo_model}" in run.stderr
    diagnosis = report["diagnosis"]  # the config and weight passes, beside the verdict
    assert diagnosis["ran"] and diagnosis["weight_counts"] == {"identical": 242, "scaled": 30}
    assert diagnosis["findings"][0]["summary"].startswith("q_proj in all 30 layers = 1.0695 × reference")


def test_corpus_mode_passes_the_same_weights_and_writes_a_report(demo_model, corpus, tmp_path):
    html = tmp_path / "report.html"
    run = verify(str(demo_model), str(demo_model), "--corpus", str(corpus), *FAST, "--html", str(html))
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout
    # llama.cpp's rows, candidate beside the noise floor, then the verdict and its reasons.
    for row in ("Mean    KLD", "99.9%   KLD", "Median  KLD", "Mean    Δp", "RMS Δp", "Same top p", "P(diverged by 16)"):
        assert row in text, row
    assert "candidate" in text and "noise floor" in text
    assert "Verdict: PASS" in text and "within the limit: mean token KL" in text
    assert "first decided 'pass' after 8 of 8 sequences, and held it to the end" in text
    assert "Config and weights (diagnose): nothing departs beyond dtype rounding (272 tensors: identical 272;" in text
    page = html.read_text()
    assert page.count("<svg") == 4 and "<script" not in page and "Verdict: PASS" in page
    assert "Config and weights (diagnose): nothing departs" in page
    shot = tmp_path / "report.png"
    console = screenshot(html, shot)
    assert console == [], console


def test_a_weight_finding_is_shown_beside_a_passing_verdict_and_strict_fails_on_it(demo_model, corpus, tmp_path):
    """One layer's q_proj x 1.10 served in bf16: its drift is within the noise floor's
    tolerance (the verdict says so), but the weight pass names the scale under the verdict,
    in the text and the HTML report, and `--strict` exits 1 on it."""
    candidate = q_scaled_one_layer(demo_model, tmp_path / "q_scaled")
    html = tmp_path / "report.html"
    run = verify(str(candidate), str(demo_model), "--corpus", str(corpus), *FAST, "--dtype", "bfloat16", "--strict",
                 "--html", str(html))
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    verdict = next(line for line in lines if line.startswith("Verdict: "))
    assert not verdict.startswith("Verdict: FAIL"), verdict  # the drift alone does not fail it
    at = lines.index(next(line for line in lines if line.startswith("Config and weights (diagnose): 1 named departure")))
    assert at > lines.index(verdict)
    assert lines[at + 1] == "  1. [weights] q_proj in layer 29 = 1.1000 × reference"
    assert "--strict: the config and weight passes name a departure: q_proj in layer 29 = 1.1000 × reference" in run.stderr
    page = html.read_text()
    assert "q_proj in layer 29 = 1.1000 × reference" in page and "Config and weights" in page
