"""`plan`'s KV-cache capacity against the line vLLM logs at start, on the suite's own vLLM
server (fp32 SmolLM2, --kv-cache-gib 1), with the block size vLLM's CPU platform sets (128)."""

from __future__ import annotations

import json
import re

import pytest

from adapters.plan import Device, plan

pytestmark = pytest.mark.integration


def test_plan_reproduces_vllms_kv_cache_tokens(vllm_server, demo_model):
    log = vllm_server.log_path.read_text(errors="replace")
    logged = re.search(r"KV cache size: ([\d,]+) tokens", log)
    assert logged, "vLLM logged no KV cache size"
    tokens = int(logged.group(1).replace(",", ""))
    block_size = 128  # vllm/platforms/cpu.py sets cache_config.block_size = 128 when unset
    config = json.loads((demo_model / "config.json").read_text())
    planned = plan(config, Device("cpu", 1000, 100, block_size), dtype="fp32", kv_cache_gib=1.0, reserve_gib=0)
    assert planned.kv_tokens == tokens
