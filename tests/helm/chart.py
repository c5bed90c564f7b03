"""Render the chart with the Helm SDK (no helm binary), pick out its objects (typed as the
Kubernetes client's models where they are core kinds) and collect its PromQL. Shared by the
chart tests (tests/helm/test_chart_*.py) and tests/integration/test_prometheus_queries.py."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "shadowserve"
CANARY_VALUES = yaml.safe_load((CHART / "values-canary.yaml").read_text())
# The core kinds the chart renders, by the Kubernetes client's model for each.
CORE = {"Deployment": "V1Deployment", "Service": "V1Service", "Secret": "V1Secret", "ConfigMap": "V1ConfigMap",
        "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler", "NetworkPolicy": "V1NetworkPolicy"}


def render(values: dict | None = None, name: str = "shadowserve-stable") -> list[dict]:
    from helm_python import Chart

    chart = Chart.load(str(CHART))
    try:
        files = chart.render(values or {}, name=name, namespace="llm")
    finally:
        chart.close()
    return [doc for text in files.values() for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def deployment(docs: list[dict], component: str) -> dict:
    """The Deployment of one component (`candidate`, `reference`)."""
    return next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith(f"-{component}"))


def as_k8s(doc: dict):
    """Deserialize into the Kubernetes client's typed model (validates required fields)."""
    from kubernetes.client import ApiClient

    return ApiClient().deserialize(json.dumps(doc), CORE[doc["kind"]], "application/json")


def dashboard(docs: list[dict]) -> dict:
    (config_map,) = by_kind(docs, "ConfigMap")
    return json.loads(config_map["data"]["shadowserve.json"])


def rule_groups(docs: list[dict]) -> dict:
    (rule,) = by_kind(docs, "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def all_queries(stable: list[dict], canary: list[dict]) -> dict[str, str]:
    """Every PromQL expression the chart ships that should return data: dashboard targets,
    recording rules, canary analyses. Keyed by where it lives. (Alert expressions return
    data only when they fire; their evaluation is checked through Prometheus's rule API.)

    Dashboard targets keep `$model`, `$variant` and Grafana's interval variables for the
    caller to substitute; `$adapter` is substituted here with the variable's All value
    (`.*`, which also matches the base model's series, which have no adapter label), as
    Grafana does on a dashboard left at All."""
    board = dashboard(stable)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    all_adapters = variables["adapter"]["allValue"]
    queries = {}
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$adapter", all_adapters)
            queries[f"dashboard: {panel['title']} [{target['legendFormat']}]"] = expr
    for group in rule_groups(stable)["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                queries[f"record: {rule['record']}"] = rule["expr"]
    for template in by_kind(canary, "AnalysisTemplate"):
        for metric in template["spec"]["metrics"]:
            queries[f"argo: {metric['name']}"] = metric["provider"]["prometheus"]["query"]
    for template in by_kind(canary, "MetricTemplate"):
        queries[f"flagger: {template['metadata']['name']}"] = template["spec"]["query"]
    return queries
