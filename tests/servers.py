"""Start a real `shadowserve serve` process for integration tests and wait until ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None = None
    health_seen: list[int] = field(default_factory=list)  # /health codes while starting

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


# The shadow's share of the host (a duty-cycle cap, one low-priority thread) keeps a local
# reference from slowing clients. Tests wait for its results instead, so they lift it;
# the benchmarks keep the defaults they measure (unconfined=False).
UNCONFINED = ["--shadow-max-duty", "1", "--shadow-reference-threads", "0", "--shadow-reference-nice", "0"]


def start_server(args: list[str], log_path: Path, api_key: str | None = None, timeout: float = 300,
                 unconfined: bool = True, env: dict[str, str] | None = None) -> RunningServer:
    """`shadowserve serve ARGS` on a free port, waiting for /health to answer 200."""
    port = free_port()
    confinement = UNCONFINED if unconfined else []
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *confinement, *args]
    if api_key:
        cmd += ["--api-keys", api_key]
    return launch(cmd, port, log_path, api_key, timeout, env)


def launch(cmd: list[str], port: int, log_path: Path, api_key: str | None = None, timeout: float = 300,
           env: dict[str, str] | None = None) -> RunningServer:
    """Any OpenAI-compatible server command listening on `port` (vLLM's own, for baselines);
    `env`: variables added to the server's environment."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, api_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            code = httpx.get(f"{server.url}/health", timeout=2).status_code
            server.health_seen.append(code)
            if code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log_tail()}")
