"""Session-wide fixtures: the demo model and one real server per engine (started once)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from adapters.demo_model import ensure_demo_model
from tests.servers import RunningServer, free_port, launch, start_server

# vLLM's CPU backend keeps one core for its API front end; on the 2-core test machine the
# engine decodes ~1.7x faster with both (the servers' front ends are mostly idle here).
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

API_KEY = "test-key"
REFERENCE_TOKEN = "reference-token"
MODEL_NAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return ensure_demo_model()


@pytest.fixture(scope="session")
def vllm_server(demo_model: Path, tmp_path_factory) -> RunningServer:
    """The default engine, in fp32 so it can be checked against transformers. The shadow
    (fp32 reference, same weights) is on only for requests sent with `X-Shadow: always`."""
    server = start_server(
        ["--model", str(demo_model), "--engine", "vllm", "--dtype", "float32", "--enforce-eager", "true",
         "--max-model-len", "2048", "--kv-cache-gib", "1", "--shadow-allow-header", "true"],
        tmp_path_factory.mktemp("vllm") / "server.log",
        api_key=API_KEY,
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hf_server(demo_model: Path, tmp_path_factory) -> RunningServer:
    server = start_server(
        ["--model", str(demo_model), "--engine", "transformers", "--dtype", "float32", "--max-model-len", "2048"],
        tmp_path_factory.mktemp("hf") / "server.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reference_server(demo_model: Path, tmp_path_factory) -> RunningServer:
    """`shadowserve reference` on the demo model (fp32), behind a bearer token."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "reference", "--model", str(demo_model), "--port", str(port),
           "--tokens", REFERENCE_TOKEN]
    server = launch(cmd, port, tmp_path_factory.mktemp("reference") / "server.log", api_key=REFERENCE_TOKEN)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tokenizer(demo_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)
