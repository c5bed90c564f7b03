"""A start that never finishes must not hold the process (server/lifecycle.abandon_load).

vLLM 0.32 was seen to hang at start after a failed compile (its worker swallowed the
SystemExit of its SIGTERM handler inside a weakref callback; EngineCore then waited on
it for ever, and so did the server, answering "loading"). Here `shadowserve serve` runs
for real, with only its loader replaced by one that starts a child process (as vLLM's
EngineCore is one) and then blocks for ever, or raises SystemExit as a library may.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.servers import free_port

DRIVER = """
import subprocess, sys, threading
from server.cli import run_server
from server import assembly
from server.settings import ServeSettings

def load(settings, registry):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("child", child.pid, flush=True)
    if {how!r} == "exit":
        raise SystemExit(3)
    threading.Event().wait()

assembly.assemble_serving = load
run_server(ServeSettings(model={model!r}, engine="transformers", port={port}, start_timeout_s={timeout}))
"""


def serve(demo_model: Path, how: str, timeout: float) -> tuple[subprocess.Popen, int, int]:
    port = free_port()
    code = DRIVER.format(how=how, model=str(demo_model), port=port, timeout=timeout)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert line.startswith("child "), (line, process.stderr.read() if process.poll() is not None else "")
    return process, port, int(line.split()[1])


def ended(process: subprocess.Popen, within: float) -> tuple[int, str]:
    try:
        _, err = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running {within:.0f}s on: {process.communicate()[1][-2000:]}")
    return process.returncode, err


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_start_past_its_timeout_exits_1_and_ends_the_engine_processes(demo_model):
    process, port, child = serve(demo_model, "hang", timeout=3)
    started = time.monotonic()
    code, err = ended(process, within=40)
    assert code == 1, err[-2000:]
    assert "engine did not start within 3s (--start-timeout-s)" in err
    assert time.monotonic() - started < 30
    assert gone(child)


def test_sigterm_during_a_hung_start_exits_0_at_once(demo_model):
    process, port, child = serve(demo_model, "hang", timeout=0)
    deadline = time.monotonic() + 30
    while True:  # up and answering, still loading
        try:
            reply = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert reply.status_code == 503 and reply.json() == {"status": "loading"}
    os.kill(process.pid, signal.SIGTERM)
    code, err = ended(process, within=30)
    assert code == 0, err[-2000:]
    assert gone(child)


def test_a_system_exit_in_the_load_thread_is_a_failed_start(demo_model):
    process, _, child = serve(demo_model, "exit", timeout=0)
    code, err = ended(process, within=40)
    assert code == 1, err[-2000:]
    assert "engine failed to load: SystemExit(3)" in err
    os.kill(child, signal.SIGKILL)  # a child a failed loader left behind is that loader's to end
