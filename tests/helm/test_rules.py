"""The chart's rules pass `promtool check rules`; `promtool test rules` shows the verdict
alerts and the canary gate on synthetic series: they read the server's verdict gauges
(anytime-valid), not the point estimates, so a within-tolerance canary whose point
estimate wanders over the limit does not trip them; one replica's proven fail is a fail,
a pass needs every replica; the absolute fallback fires only while the noise floor is off."""

from __future__ import annotations

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


def verdict(*replicas: tuple[int, int]) -> list[dict]:
    """The server's verdict gauges, per replica: (state, different) for 40 minutes; a
    state may change at minute 20 as (before, after)."""
    series = []
    for n, (state, different) in enumerate(replicas):
        pod = f'pod="candidate-{n}"'
        values = f"{state[0]}x19 {state[1]}x20" if isinstance(state, tuple) else f"{state}x{MINUTES}"
        series += [{"series": f"shadow_verdict_state{{{LABELS},{pod}}}", "values": values},
                   {"series": f"shadow_verdict_different{{{LABELS},{pod}}}", "values": f"{different}x{MINUTES}"}]
    return series


def firing_alerts(firing: tuple[str, ...], severity: str = "critical") -> dict:
    """The shadow alerts of a severity firing at 30 minutes: exactly these."""
    return {"expr": f'ALERTS{{alertstate="firing",severity="{severity}"}}', "eval_time": "30m", "exp_samples": [
        {"labels": f'ALERTS{{alertname="{name}",alertstate="firing",severity="{severity}",{LABELS}}}', "value": 1}
        for name in firing]}


def gate_value(gates: dict[str, str], value: int) -> dict:
    return {"expr": gates["verdict"], "eval_time": "30m", "exp_samples": [{"labels": "{}", "value": value}]}


def scenario(series: list[dict], firing: tuple[str, ...], gates: dict[str, str], gate: int, warnings=()) -> dict:
    return {"interval": "1m", "input_series": series,
            "promql_expr_test": [firing_alerts(firing), firing_alerts(warnings, "warning"), gate_value(gates, gate)]}


def test_the_gate_reads_the_verdict_not_the_point_estimates(promtool, rules_file, gates, tmp_path):
    # A within-tolerance canary whose point estimate wanders over the 2x limit (2.4x in
    # this window): the recording rule says so, but the verdict, which has intervals and
    # proved a pass, stands: no alert, and the gate passes.
    wandering = scenario(traffic(kl_times=2.4) + verdict((1, 0), (1, 0)), (), gates, 1)
    wandering["promql_expr_test"].append({
        "expr": "round(10 * shadow:kl_noise_ratio:rate10m)", "eval_time": "30m",
        "exp_samples": [{"labels": f"{{{LABELS}}}", "value": 24}]})
    out = run_promtool(promtool, rules_file, [wandering], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_one_replicas_proven_fail_is_a_fail(promtool, rules_file, gates, tmp_path):
    # Two replicas; one proves a fail at minute 20, the other still passes.
    failing = scenario(traffic(kl_times=5.0) + verdict((1, 0), ((0, -1), 1)), ("ShadowVerdictFail",), gates, -1)
    out = run_promtool(promtool, rules_file, [failing], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_pass_needs_every_replica_and_an_undecided_one_waits(promtool, rules_file, gates, tmp_path):
    waiting = scenario(traffic() + verdict((1, 0), (0, 0)), (), gates, 0)
    nothing = scenario(traffic(), (), gates, 0)  # no verdict series yet: undecided, not an error
    out = run_promtool(promtool, rules_file, [waiting, nothing], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_detectably_different_candidate_warns_within_tolerance(promtool, rules_file, gates, tmp_path):
    different = scenario(traffic(kl_times=1.4) + verdict((1, 1), (1, 0)), (), gates, 1,
                         warnings=("ShadowCandidateDetectablyDifferent",))
    out = run_promtool(promtool, rules_file, [different], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_without_a_noise_floor_only_the_absolute_fallback_alerts(promtool, rules_file, gates, tmp_path):
    blind = scenario(traffic(noise_floor=False, hard=4) + verdict((0, 0)), ("ShadowHardDivergenceRateHigh",), gates, 0)
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
