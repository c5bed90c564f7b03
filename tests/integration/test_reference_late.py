"""A server whose remote reference is down when it starts: it serves anyway, counts
its sampled requests as `error` outcomes, and compares traffic once `shadowserve
reference` comes up on that address (checked as at start: vocabulary, noise dtype)."""

from __future__ import annotations

import sys
import time

import httpx
import pytest

from tests.conftest import MODEL_NAME, REFERENCE_TOKEN
from tests.servers import free_port, launch, start_server

pytestmark = pytest.mark.integration


def chat(server) -> None:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
            "temperature": 0}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).status_code == 200


def outcomes(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("shadow_samples_total{"):
            name = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[name] = out.get(name, 0) + float(line.rsplit(" ", 1)[1])
    return out


def test_a_reference_coming_up_late_is_checked_then_compared(demo_model, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(
        ["--model", str(demo_model), "--engine", "transformers", "--dtype", "float32", "--shadow-rate", "1.0",
         "--shadow-reference-url", url, "--shadow-reference-token", REFERENCE_TOKEN, "--shadow-reference-name", "late"],
        tmp_path / "server.log", timeout=180,
    )
    reference = None
    try:
        # Nothing listens there: requests succeed, their samples are errors.
        chat(server)
        chat(server)
        assert outcomes(server).get("error") == 2 and outcomes(server).get("compared", 0) == 0, server.log_tail()

        cmd = [sys.executable, "-m", "server.cli", "reference", "--model", str(demo_model), "--port", str(port),
               "--tokens", REFERENCE_TOKEN, "--noise-dtype", "float32"]
        reference = launch(cmd, port, tmp_path / "reference.log", api_key=REFERENCE_TOKEN, timeout=180)

        # The retry (backing off to 30 s at most) finds it, checks it, and samples compare.
        deadline = time.monotonic() + 60
        while outcomes(server).get("compared", 0) < 1:
            assert time.monotonic() < deadline, server.log_tail()
            chat(server)
            time.sleep(1)
        log = (tmp_path / "server.log").read_text()
        assert log.count(f"remote reference {url} unreachable") == 1 and log.count("is up (SmolLM2") == 1, log[-3000:]
        assert "DISABLED" not in log
        text = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert 'reference="late"' in text and 'comparison="noise_floor"' in text
    finally:
        server.stop()
        if reference is not None:
            reference.stop()
