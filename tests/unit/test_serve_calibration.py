"""`serve --verdict-calibrate` (server/verify/calibrate.py): the settings it needs, what it
asks the child to measure, and what the server does with each answer. The child process
is replaced here (a narrow fake of `subprocess.run`); tests/integration/test_verify_verdicts.py
runs the real one on vLLM."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from server.assembly import CALIBRATION_UNAVAILABLE
from server.settings import ServeSettings
from server.verify.calibrate import calibrate_before_serving, serve_calibration
from server.verify.settings import VerifySettings
from shadow.calibration import CalibrationError


def settings(model, tmp_path, **overrides) -> ServeSettings:
    values = dict(model=model, engine="vllm", dtype="bfloat16", shadow_rate=0.5, verdict_calibrate=True,
                  verdict_calibration=tmp_path / "cal.json", kv_cache_gib=1.0, enforce_eager=False)
    return ServeSettings(**{**values, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"verdict_calibration": None}, "writes to --verdict-calibration FILE"),
    ({"shadow_rate": 0.0}, "turn the shadow on"),
    ({"dtype": "auto"}, "give --dtype explicitly"),
    ({"shadow_top_k": 128, "max_logprobs": 128}, "--shadow-top-k must be at most 100"),
    ({"shadow_reference_url": "http://127.0.0.1:9/"}, "not --shadow-reference-url"),
    ({"verdict_calibrate_samples": 4}, "greater than or equal to 8"),
])
def test_settings_it_cannot_work_with_are_refused(demo_model, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        settings(demo_model, tmp_path, **overrides)


def test_the_child_measures_the_servers_own_engine_on_the_reference(demo_model, tmp_path):
    serve = settings(demo_model, tmp_path, verdict_calibrate_samples=16, shadow_top_k=10, verdict_confidence=0.99,
                     max_num_seqs=4, quantization="fp8", gpu_memory_utilization=0.5)
    job = serve_calibration(serve)
    assert (job.candidate, job.reference, job.engine, job.dtype) == (demo_model, demo_model, "vllm", "bfloat16")
    assert job.gpu_memory_utilization == 0.5 and job.engine_settings().gpu_memory_utilization == 0.5
    assert job.enforce_eager is False and job.kv_cache_gib == 1.0 and job.max_num_seqs == 4
    assert job.quantization is None  # the candidate checkpoint's, not the engine's
    assert (job.samples, job.top_k, job.verdict_confidence, job.calibrate) == (16, 10, 0.99, True)
    assert job.verdict_calibration == tmp_path / "cal.json"
    # what the child reads back from its stdin is the same job
    assert VerifySettings.model_validate_json(job.model_dump_json(by_alias=True)) == job


class FakeChild:
    """subprocess.run as the child would answer: writes the file on success."""

    def __init__(self, returncode: int, stdout: str = "", writes: bool = False):
        self.returncode, self.stdout, self.writes, self.calls = returncode, stdout, writes, []

    def __call__(self, cmd, *, input, **kwargs):
        job = json.loads(input)
        self.calls.append((cmd, job, kwargs))
        if self.writes:
            Path(job["verdict_calibration"]).write_text("{}")
        return subprocess.CompletedProcess(cmd, self.returncode, self.stdout)


def test_a_measured_calibration_is_served_with(demo_model, tmp_path):
    serve = settings(demo_model, tmp_path)
    child = FakeChild(0, "calibrated to vllm ...", writes=True)
    assert calibrate_before_serving(serve, run=child) is serve
    (cmd, job, kwargs), = child.calls
    assert cmd[1:] == ["-m", "server.verify.calibrate"] and job["calibrate"] is True
    assert kwargs["env"]["VLLM_LOGGING_STREAM"] == "ext://sys.stderr"  # stdout carries only the answer


def test_an_existing_file_is_not_measured_again(demo_model, tmp_path):
    serve = settings(demo_model, tmp_path)
    serve.verdict_calibration.write_text("{}")  # checked against the engine once it loads, as without the flag
    child = FakeChild(0)
    assert calibrate_before_serving(serve, run=child) is serve and child.calls == []
    off = settings(demo_model, tmp_path, verdict_calibrate=False)
    assert calibrate_before_serving(off, run=child) is off and child.calls == []


def test_a_reference_the_engine_cannot_serve_keeps_the_transformers_floor(demo_model, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    child = FakeChild(CALIBRATION_UNAVAILABLE, "vllm could not serve the reference: ValueError: unknown architecture")
    served = calibrate_before_serving(settings(demo_model, tmp_path), run=child)
    assert served.verdict_calibration is None and served.verdict_calibrate is True
    assert "not calibrated: vllm could not serve the reference: ValueError: unknown architecture" in caplog.text
    # an unmerged adapter is known without a child
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    child = FakeChild(0)
    served = calibrate_before_serving(settings(demo_model, tmp_path, shadow_reference_adapter=adapter), run=child)
    assert served.verdict_calibration is None and child.calls == []
    assert "unmerged adapter" in caplog.text


@pytest.mark.parametrize("returncode", [2, -9, 0])  # bad settings, killed, "done" with no file
def test_a_measurement_that_broke_stops_the_start(demo_model, tmp_path, returncode):
    child = FakeChild(returncode, "bad calibration settings: ..." if returncode == 2 else "")
    with pytest.raises(CalibrationError, match=f"failed \\(exit {returncode}\\)"):
        calibrate_before_serving(settings(demo_model, tmp_path), run=child)


def test_the_child_answers_on_stdout_with_its_exit_code(demo_model, tmp_path):
    """The real child, where it needs no engine: an adapter reference (exit 4, the reason)
    and settings it cannot read (exit 2)."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    job = VerifySettings(candidate=demo_model, reference=demo_model, adapter=adapter, dtype="bfloat16", calibrate=True,
                         verdict_calibration=tmp_path / "cal.json")
    cmd = [sys.executable, "-m", "server.verify.calibrate"]
    child = subprocess.run(cmd, input=job.model_dump_json(by_alias=True), capture_output=True, text=True, timeout=300)
    assert child.returncode == CALIBRATION_UNAVAILABLE and "unmerged adapter" in child.stdout, child.stderr[-2000:]
    assert not (tmp_path / "cal.json").exists()
    child = subprocess.run(cmd, input="{not json", capture_output=True, text=True, timeout=300)
    assert child.returncode == 2 and child.stdout.startswith("bad calibration settings:"), child.stderr[-2000:]


def test_only_an_engine_that_cannot_load_the_reference_is_unavailable(demo_model, tmp_path, monkeypatch):
    """An engine that cannot serve the reference keeps the transformers floor; a measurement
    that broke after it loaded (out of memory, an untrusted reference) is an error."""
    from server.verify import calibrate as module
    from server.verify.run import EngineLoadError
    from shadow.reference_check import ReferenceUntrustedError

    job = VerifySettings(candidate=demo_model, reference=demo_model, dtype="bfloat16", calibrate=True,
                         verdict_calibration=tmp_path / "cal.json")
    for raised, expected in [(EngineLoadError("vllm could not load x: ValueError: no"), module.CalibrationUnavailable),
                             (MemoryError("out of memory"), MemoryError),
                             (ReferenceUntrustedError("refusing to judge"), ReferenceUntrustedError)]:
        async def fake_verify(settings, raised=raised):
            raise raised
        monkeypatch.setattr(module, "verify", fake_verify)
        with pytest.raises(expected):
            asyncio.run(module.calibrate(job))


def test_a_reference_is_named_by_its_directory_however_it_is_given(demo_model, monkeypatch):
    from shadow.local_scorer import _dir_name

    monkeypatch.chdir(demo_model)
    assert _dir_name(Path(".")) == _dir_name(Path(f"{demo_model}/")) == demo_model.name
