"""A real Prometheus scrapes a running shadowserve (vLLM bf16, shadow on, canary label);
after traffic, every PromQL expression the chart ships — dashboard panels, alert rules,
canary analyses — returns data through Prometheus's HTTP API."""

from __future__ import annotations

import math
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from tests.helm.chart import CANARY_VALUES, all_queries, render
from tests.servers import free_port, start_server

pytestmark = pytest.mark.integration

SERVED = "candidate"  # the chart's default servedModelName, which its canary queries select
PROMPTS = ["Describe the city of Paris.", "Why is the sky blue?", "Write a haiku about the sea.",
           "Explain how vaccines work.", "Tell me a story about a dragon.", "How do airplanes fly?"]


@pytest.fixture(scope="module")
def scraped_server(demo_model, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: `make test` installs Debian's prometheus package")
    tmp = tmp_path_factory.mktemp("prometheus")
    server = start_server(
        ["--model", str(demo_model), "--served-model-name", SERVED, "--dtype", "bfloat16", "--engine", "vllm",
         "--enforce-eager", "true", "--max-model-len", "2048", "--kv-cache-gib", "1",
         "--shadow-rate", "1.0", "--shadow-labels", "variant=canary"],
        tmp / "server.log",
    )
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [{"job_name": "shadowserve", "static_configs": [{"targets": [server.url.removeprefix("http://")]}]}]}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(tmp / "prometheus.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert time.monotonic() < deadline and prometheus.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        for prompt in PROMPTS:
            body = {"model": SERVED, "messages": [{"role": "user", "content": prompt}], "max_tokens": 64, "temperature": 0}
            assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300).status_code == 200
        deadline = time.monotonic() + 180
        while _value(url, 'sum(shadow_samples_total{outcome="compared"})') < len(PROMPTS):
            assert time.monotonic() < deadline, "samples never reached Prometheus as compared"
            time.sleep(1)
        time.sleep(5)  # a few more scrapes, so every rate() has points on both sides
        yield url
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        server.stop()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def query(url: str, expr: str) -> list:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def _value(url: str, expr: str) -> float:
    result = query(url, expr)
    return float(result[0]["value"][1]) if result else 0.0


def grafana(expr: str) -> str:
    """Substitute the dashboard's variables as Grafana would for this release."""
    return (expr.replace("$model", SERVED).replace("$variant", "canary")
            .replace("$__rate_interval", "5m").replace("$__range", "5m"))


QUERIES = all_queries(render(), render(CANARY_VALUES, name="shadowserve-canary"))


@pytest.mark.parametrize("expr", QUERIES.values(), ids=QUERIES.keys())
def test_every_shipped_query_returns_data(scraped_server, expr):
    result = query(scraped_server, grafana(expr))
    assert result, f"no data for: {grafana(expr)}"


def test_the_gates_see_the_right_numbers(scraped_server):
    hard = _value(scraped_server, grafana(QUERIES["argo: hard-divergence-ratio"]))
    kl = _value(scraped_server, grafana(QUERIES["argo: mean-token-kl"]))
    # bf16 against its own fp32 weights: precision noise only, which the gates let through.
    assert hard == 0.0
    assert 0.0 < kl < 0.01 and math.isfinite(kl)
