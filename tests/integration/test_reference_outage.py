"""Outages of a remote reference lose no sample, with real processes: a candidate
(transformers engine) whose `shadowserve reference` is down when it starts, then comes
up; then is killed (SIGKILL) while clients chat, and restarted on the same address ~10 s
later. Every client gets its answer, every sampled request is compared once the
reference is back (none counted `error` or `dropped`), and `shadow_reference_up` reads 0
during the outage and 1 after it, with the retries counted."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL_NAME, REFERENCE_TOKEN
from tests.servers import RunningServer, free_port, launch, start_server

pytestmark = pytest.mark.integration


def chat(server: RunningServer, n: int = 0) -> int:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": f"Name a colour ({n})."}], "max_tokens": 4,
            "temperature": 0}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).status_code


def shadow(server: RunningServer) -> dict[str, float]:
    """The shadow's series, summed over their labels: outcomes by name, and the rest by series name."""
    out: dict[str, float] = {}
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("shadow_"):
                key = sample.labels["outcome"] if sample.name == "shadow_samples_total" else sample.name
                out[key] = out.get(key, 0) + sample.value
    return out


def wait(server: RunningServer, done, timeout: float = 120) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while not done(seen := shadow(server)):
        assert time.monotonic() < deadline, (seen, server.log_tail())
        time.sleep(0.5)
    return seen


def start_reference(demo_model, port: int, log) -> RunningServer:
    cmd = [sys.executable, "-m", "server.cli", "reference", "--model", str(demo_model), "--port", str(port),
           "--tokens", REFERENCE_TOKEN, "--noise-dtype", "float32"]
    return launch(cmd, port, log, api_key=REFERENCE_TOKEN, timeout=180)


def test_an_outage_loses_no_sample(demo_model, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(
        ["--model", str(demo_model), "--engine", "transformers", "--dtype", "float32", "--shadow-rate", "1.0",
         "--shadow-reference-url", url, "--shadow-reference-token", REFERENCE_TOKEN, "--shadow-reference-name", "late"],
        tmp_path / "server.log", timeout=180,
    )
    reference = None
    try:
        # Nothing listens there yet: requests succeed, their samples wait.
        assert chat(server) == chat(server) == 200
        seen = shadow(server)
        assert (seen.get("error"), seen.get("compared"), seen["shadow_queue_depth"], seen["shadow_reference_up"]) == \
            (0, 0, 2, 0), server.log_tail()

        reference = start_reference(demo_model, port, tmp_path / "reference-1.log")
        wait(server, lambda s: s["compared"] == 2)  # the waiting samples, once it is checked

        # Killed while clients chat; back on the same address ~10 s later.
        codes: list[int] = []
        down_seen: list[float] = []

        def clients() -> None:
            with ThreadPoolExecutor(2) as pool:
                for code in pool.map(lambda n: (time.sleep(0.5 * n), chat(server, n))[1], range(24)):
                    codes.append(code)

        load = threading.Thread(target=clients)
        load.start()
        time.sleep(1.5)
        reference.process.kill()
        reference.process.wait(10)
        killed = time.monotonic()
        down_seen.append(wait(server, lambda s: s["shadow_reference_up"] == 0, timeout=30)["shadow_reference_up"])
        time.sleep(max(0.0, 10 - (time.monotonic() - killed)))
        reference = start_reference(demo_model, port, tmp_path / "reference-2.log")
        load.join(120)
        assert codes == [200] * 24  # no client saw the outage

        sampled = 2 + 24
        seen = wait(server, lambda s: s["compared"] == sampled)
        print(f"\n[reference outage] {sampled} sampled, {seen['compared']:.0f} compared, "
              f"{seen['shadow_reference_retries_total']:.0f} retries, up {down_seen[0]:.0f} -> {seen['shadow_reference_up']:.0f}")
        assert seen["error"] == seen["dropped"] == seen["skipped"] == 0 and seen["shadow_sampled_total"] == sampled
        assert seen["shadow_reference_retries_total"] >= 1 and seen["shadow_reference_up"] == 1
        log = (tmp_path / "server.log").read_text()
        assert "DISABLED" not in log and log.count(f"remote reference {url} is up (SmolLM2") == 2, log[-3000:]
    finally:
        server.stop()
        if reference is not None:
            reference.stop()
