"""The chart's alert rules pass `promtool check rules`, and `promtool test rules` shows
each alert firing on synthetic series (and staying quiet on healthy ones)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.helm.chart import render, rule_groups

LABELS = 'model="cand",variant="canary"'


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: `make test` installs Debian's prometheus package")
    return path


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rules") / "shadowserve.rules.yaml"
    path.write_text(yaml.safe_dump(rule_groups(render())))
    return str(path)


def test_promtool_check_rules(promtool, rules_file):
    out = subprocess.run([promtool, "check", "rules", rules_file], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 3 rules found" in out.stdout


def series(name: str, labels: str, per_minute: int) -> dict:
    return {"series": f"{name}{{{LABELS},{labels}}}", "values": f"0+{per_minute}x40"}


def firing(alert: str, severity: str, summary: str, description: str) -> dict:
    return {"eval_time": "30m", "alertname": alert, "exp_alerts": [{
        "exp_labels": {"severity": severity, "model": "cand", "variant": "canary"},
        "exp_annotations": {"summary": summary, "description": description}}]}


def quiet(alert: str) -> dict:
    return {"eval_time": "30m", "alertname": alert, "exp_alerts": []}


def test_promtool_test_rules(promtool, rules_file, tmp_path):
    rules = {r["alert"]: r["annotations"]["description"] for g in rule_groups(render())["groups"] for r in g["rules"]}
    unhealthy = {
        "interval": "1m",
        "input_series": [
            # 30 of 100 sequences per minute diverge hard; 20 of 100 samples dropped; 10 of 100 errors.
            series("shadow_sequences_total", 'result="hard"', 30),
            series("shadow_sequences_total", 'result="identical"', 70),
            series("shadow_samples_total", 'outcome="compared"', 70),
            series("shadow_samples_total", 'outcome="dropped"', 20),
            series("shadow_samples_total", 'outcome="error"', 10),
        ],
        "alert_rule_test": [
            firing("ShadowHardDivergenceRateHigh", "critical", "cand (canary): 30% of shadowed sequences diverge hard",
                   rules["ShadowHardDivergenceRateHigh"]),
            firing("ShadowSamplesDropped", "warning", "cand (canary): 20% of shadow samples dropped", rules["ShadowSamplesDropped"]),
            firing("ShadowReferenceErrors", "warning", "cand (canary): 10% of shadow samples fail on the reference",
                   rules["ShadowReferenceErrors"]),
        ],
    }
    healthy = {
        "interval": "1m",
        "input_series": [
            series("shadow_sequences_total", 'result="hard"', 1),
            series("shadow_sequences_total", 'result="near_tie"', 50),
            series("shadow_sequences_total", 'result="identical"', 49),
            series("shadow_samples_total", 'outcome="compared"', 100),
            series("shadow_samples_total", 'outcome="dropped"', 0),
            series("shadow_samples_total", 'outcome="error"', 0),
        ],
        "alert_rule_test": [quiet(a) for a in rules],
    }
    test_file = tmp_path / "rules.test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [rules_file], "evaluation_interval": "1m",
                                         "tests": [unhealthy, healthy]}))
    out = subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
