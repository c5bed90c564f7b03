"""The chart's rules pass `promtool check rules`; `promtool test rules` shows the
noise-relative alerts and canary gates on synthetic series: a noisy-but-healthy canary
passes, a canary at 5x the noise floor's KL fails, too little data is inconclusive, and
the absolute fallback fires only while the noise floor is off."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import yaml

from tests.helm.chart import CANARY_VALUES, by_kind, render, rule_groups

LABELS = 'model="candidate",variant="canary"'
MINUTES = 40


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


@pytest.fixture(scope="module")
def gates() -> dict[str, str]:
    """The Argo gate queries of a canary release, by metric name."""
    (template,) = by_kind(render(CANARY_VALUES, name="shadowserve-canary"), "AnalysisTemplate")
    return {m["name"]: m["provider"]["prometheus"]["query"] for m in template["spec"]["metrics"]}


def run_promtool(promtool: str, rules_file: str, tests: list[dict], tmp_path) -> subprocess.CompletedProcess:
    test_file = tmp_path / "rules.test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [rules_file], "evaluation_interval": "1m", "tests": tests}))
    return subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)


def test_promtool_check_rules(promtool, rules_file):
    out = subprocess.run([promtool, "check", "rules", rules_file], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 10 rules found" in out.stdout


def counter(name: str, labels: str, per_minute: float) -> dict:
    return {"series": f"{name}{{{LABELS},{labels}}}", "values": f"0+{per_minute}x{MINUTES}"}


def traffic(*, sequences: int = 20, tokens: int = 1280, noise_kl: float = 1.1, kl_times: float = 1.0,
            noise_flips: int = 28, flips: int = 28, noise_hard: int = 0, hard: int = 1, noise_floor: bool = True) -> list[dict]:
    """Per minute, for each comparison: compared sequences and tokens, KL sum (nats),
    top-1 flips and hard sequences. Defaults: bf16 noise (~8.6e-4 nats/token, 2% flips)."""
    sides = {"candidate": (noise_kl * kl_times, flips, hard)}
    if noise_floor:
        sides["noise_floor"] = (noise_kl, noise_flips, noise_hard)
    series = [counter("shadow_samples_total", 'outcome="compared"', sequences)]
    for comparison, (kl, different, hard_count) in sides.items():
        c = f'comparison="{comparison}"'
        series += [
            counter("shadow_token_kl_divergence_sum", c, kl),
            counter("shadow_token_kl_divergence_count", c, tokens),
            counter("shadow_compared_sequence_tokens_count", c, sequences),
            counter("shadow_tokens_total", f'{c},top1="different"', different),
            counter("shadow_tokens_total", f'{c},top1="same"', tokens - different),
            counter("shadow_sequences_total", f'{c},result="hard"', hard_count),
            counter("shadow_sequences_total", f'{c},result="near_tie"', sequences // 2),
            counter("shadow_sequences_total", f'{c},result="identical"', sequences - sequences // 2 - hard_count),
        ]
    return series


def firing_alerts(firing: tuple[str, ...]) -> dict:
    """The critical shadow alerts firing at 30 minutes: exactly these."""
    return {"expr": 'ALERTS{alertstate="firing",severity="critical"}', "eval_time": "30m", "exp_samples": [
        {"labels": f'ALERTS{{alertname="{name}",alertstate="firing",severity="critical",{LABELS}}}', "value": 1}
        for name in firing]}


def gate_values(gates: dict[str, str], values: dict[str, float]) -> list[dict]:
    """Each gate's value in units of 1e-4 (rounded: promtool compares floats exactly).
    NaN, too little data, comes from `vector(NaN)` without labels; NaN != NaN tells it."""
    tests = []
    for name, value in values.items():
        if math.isnan(value):
            tests.append({"expr": f"({gates[name]}) != bool ({gates[name]})", "eval_time": "30m",
                          "exp_samples": [{"labels": "{}", "value": 1}]})
        else:
            tests.append({"expr": f"round(1e4 * ({gates[name]}))", "eval_time": "30m",
                          "exp_samples": [{"labels": f"{{{LABELS}}}", "value": round(1e4 * value)}]})
    return tests


def scenario(series: list[dict], firing: tuple[str, ...], gates: dict[str, str], values: dict[str, float]) -> dict:
    return {"interval": "1m", "input_series": series,
            "promql_expr_test": [firing_alerts(firing), *gate_values(gates, values)]}


def test_a_noisy_but_healthy_canary_passes(promtool, rules_file, gates, tmp_path):
    # bf16-like noise; the candidate even flips one more token and one more sequence
    # per minute than the noise floor: within the limits.
    healthy = scenario(traffic(kl_times=1.2, flips=31), (), gates, {
        "kl-noise-ratio": 1.2, "excess-top1-disagreement": 3 / 1280, "excess-hard-divergence": 0.05})
    out = run_promtool(promtool, rules_file, [healthy], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_canary_at_five_times_the_noise_kl_fails(promtool, rules_file, gates, tmp_path):
    # Same flips and hard rate as the noise floor, KL 5x: only the KL gate and alert trip.
    drifting = scenario(traffic(kl_times=5.0, hard=0), ("ShadowDriftAboveNoiseFloor",), gates, {
        "kl-noise-ratio": 5.0, "excess-top1-disagreement": 0.0, "excess-hard-divergence": 0.0})
    # A bug that flips more tokens and diverges hard, at noise-level KL.
    flipping = scenario(traffic(flips=101, hard=10), ("ShadowTop1DisagreementAboveNoiseFloor", "ShadowHardDivergenceAboveNoiseFloor"),
                        gates, {"excess-top1-disagreement": 73 / 1280, "excess-hard-divergence": 0.5})
    out = run_promtool(promtool, rules_file, [drifting, flipping], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_too_little_data_is_inconclusive(promtool, rules_file, gates, tmp_path):
    # 5 sequences / 60 tokens in the window: no alert, and every gate reads NaN
    # (Argo: neither success nor failure).
    sparse = scenario(traffic(sequences=1, tokens=6, noise_kl=0.005, kl_times=10.0, noise_flips=0, flips=1, hard=1), (), gates,
                      {name: math.nan for name in gates})
    out = run_promtool(promtool, rules_file, [sparse], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_without_a_noise_floor_only_the_absolute_fallback_alerts(promtool, rules_file, gates, tmp_path):
    blind = scenario(traffic(noise_floor=False, hard=4), ("ShadowHardDivergenceRateHigh",), gates,
                     {name: math.nan for name in gates})
    out = run_promtool(promtool, rules_file, [blind], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_drops_and_reference_errors_alert(promtool, rules_file, tmp_path):
    rules = {r["alert"]: r for g in rule_groups(render())["groups"] for r in g["rules"] if "alert" in r}
    samples = [
        {"series": f'shadow_samples_total{{{LABELS},outcome="{o}"}}', "values": f"0+{n}x{MINUTES}"}
        for o, n in (("compared", 70), ("dropped", 20), ("error", 10))
    ]
    test = {"interval": "1m", "input_series": samples, "alert_rule_test": [
        {"eval_time": "30m", "alertname": name, "exp_alerts": [{
            "exp_labels": {"severity": "warning", "model": "candidate", "variant": "canary"},
            "exp_annotations": {"summary": summary, "description": rules[name]["annotations"]["description"]}}]}
        for name, summary in (("ShadowSamplesDropped", "candidate (canary): 20% of shadow samples dropped"),
                              ("ShadowReferenceErrors", "candidate (canary): 10% of shadow samples fail on the reference"))
    ]}
    out = run_promtool(promtool, rules_file, [test], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
