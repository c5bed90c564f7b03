"""A real Prometheus scrapes a running shadowserve (vLLM bf16, shadow and noise floor on,
canary label) and evaluates the chart's rules; after traffic, every PromQL expression the
chart ships — dashboard panels, recording rules, canary gates — returns data through
Prometheus's HTTP API, every alert rule evaluates without error, and the gates read a
bf16 candidate against its own fp32 weights as healthy."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from server.verify.inputs import BUILTIN_PROMPTS
from tests.helm.chart import CANARY_VALUES, all_queries, by_kind, render, rule_groups
from tests.helm.crd_models import RelabelConfig
from tests.servers import free_port, start_server

pytestmark = pytest.mark.integration

SERVED = "candidate"  # the chart's default servedModelName, which its canary queries select
PROMPTS = BUILTIN_PROMPTS  # the gates judge nothing below 32 sequences (values: verdict.promql)


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
    (tmp / "rules.yml").write_text(yaml.safe_dump(rule_groups(render())))
    # The canary release's ServiceMonitor relabelling, as the Prometheus Operator writes it.
    (monitor,) = by_kind(render(CANARY_VALUES, name="shadowserve-canary"), "ServiceMonitor")
    relabel = [RelabelConfig.model_validate(r).as_prometheus() for r in monitor["spec"]["endpoints"][0]["metricRelabelings"]]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(tmp / "rules.yml")],
              "scrape_configs": [{"job_name": "shadowserve", "metric_relabel_configs": relabel,
                                  "static_configs": [{"targets": [server.url.removeprefix("http://")]}]}]}
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
        def chat(prompt: str) -> int:
            body = {"model": SERVED, "messages": [{"role": "user", "content": prompt}], "max_tokens": 48, "temperature": 0}
            return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=600).status_code

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert set(pool.map(chat, PROMPTS)) == {200}
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


def test_every_rule_evaluates(scraped_server):
    groups = httpx.get(f"{scraped_server}/api/v1/rules", timeout=30).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == sum(len(g["rules"]) for g in rule_groups(render())["groups"])
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    firing = [r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"]
    assert firing == []  # a healthy bf16 candidate trips nothing


def test_the_gates_see_the_right_numbers(scraped_server):
    gate = {name.removeprefix("argo: "): _value(scraped_server, grafana(q)) for name, q in QUERIES.items()
            if name.startswith("argo: ")}
    # bf16 against its own fp32 weights: precision noise only. The gate reads the server's
    # verdict (Argo's successCondition: result[0] == 1), which has proven the pass, and
    # the verdict's KL ratio interval, scraped, contains about 1x.
    assert set(gate) == {"verdict"}
    assert gate["verdict"] == 1
    low, high = (_value(scraped_server, f'shadow_verdict_interval{{statistic="kl_ratio",bound="{b}"}}') for b in ("low", "high"))
    assert 1 / 3 < low < high and low < 1.5
    assert _value(scraped_server, "shadow_verdict_different") == 0


def test_vllm_series_carry_the_release_variant(scraped_server):
    """The chart's relabelling gives vLLM's own series the release's variant (canary here),
    and leaves ours, which carry it already, as they are."""
    assert _value(scraped_server, 'count(vllm:num_requests_running{variant="canary"})') >= 1
    assert _value(scraped_server, 'count(vllm:num_requests_running{variant=""})') == 0
    assert _value(scraped_server, 'count(shadow_samples_total{variant="canary"})') >= 1
    assert _value(scraped_server, 'count({exported_variant!=""})') == 0
