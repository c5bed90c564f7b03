"""The chart's rules pass `promtool check rules`; `promtool test rules` shows the verdict
alerts and the canary gate on synthetic series: they read the server's verdict gauges
(anytime-valid), not the point estimates, so a within-tolerance canary whose point
estimate wanders over the limit does not trip them; one replica's proven fail is a fail,
a pass needs every replica; the absolute fallback fires only while the noise floor is off.
Each LoRA adapter (label `adapter`, absent for the base model) is judged on its own: no rule
pools adapters, an adapter's fail alerts for that adapter alone, and the gate reads every
adapter (one's fail is a fail) or, with `analysis.adapter`, one. The one alert not per
adapter is ShadowReferenceDown: whether a replica reaches its reference is one fact for all
its adapters."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.helm.chart import CANARY_VALUES, all_queries, by_kind, render, rule_groups

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


def gate_queries(**analysis) -> dict[str, str]:
    """The Argo gate queries of a canary release, by metric name."""
    values = {**CANARY_VALUES, "analysis": {**CANARY_VALUES["analysis"], **analysis}}
    (template,) = by_kind(render(values, name="shadowserve-canary"), "AnalysisTemplate")
    return {m["name"]: m["provider"]["prometheus"]["query"] for m in template["spec"]["metrics"]}


@pytest.fixture(scope="module")
def gates() -> dict[str, str]:
    return gate_queries()


def run_promtool(promtool: str, rules_file: str, tests: list[dict], tmp_path) -> subprocess.CompletedProcess:
    test_file = tmp_path / "rules.test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [rules_file], "evaluation_interval": "1m", "tests": tests}))
    return subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True)


def test_promtool_check_rules(promtool, rules_file):
    out = subprocess.run([promtool, "check", "rules", rules_file], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 11 rules found" in out.stdout


def of(adapter: str) -> str:
    """The series labels of the canary's base model ("") or of one of its adapters."""
    return LABELS + (f',adapter="{adapter}"' if adapter else "")


def test_every_shipped_query_parses(promtool, tmp_path):
    """Every dashboard target, recording rule and gate (adapter selected or not), with the
    dashboard's variables substituted as the integration test does, is valid PromQL: each
    is checked as a recording rule's expression. No dashboard variable is left over."""
    queries = all_queries(render(), render(CANARY_VALUES, name="shadowserve-canary"))
    for adapter in ("tenant-a", ""):
        for strict, noise_floor in ((True, True), (False, False)):
            analysis = {**CANARY_VALUES["analysis"], "adapter": adapter, "strict": strict, "noiseFloor": noise_floor}
            gates = all_queries(render(), render({**CANARY_VALUES, "analysis": analysis}, name="shadowserve-canary"))
            queries.update({f"{k} (adapter {adapter!r})": v for k, v in gates.items() if not k.startswith("dashboard")})
    assert sum(k.startswith("dashboard") for k in queries) >= 40 and any('adapter="tenant-a"' in q for q in queries.values())
    rules = []
    for n, (where, expr) in enumerate(queries.items()):
        expr = (expr.replace("$model", "candidate").replace("$variant", "canary")
                .replace("$__rate_interval", "5m").replace("$__range", "5m"))
        assert "$" not in expr, (where, expr)
        rules.append({"record": f"shipped:query:{n}", "expr": expr})
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "shipped", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


def counter(name: str, labels: str, per_minute: float, adapter: str = "") -> dict:
    return {"series": f"{name}{{{of(adapter)},{labels}}}", "values": f"0+{per_minute}x{MINUTES}"}


def traffic(*, sequences: int = 20, tokens: int = 1280, noise_kl: float = 1.1, kl_times: float = 1.0,
            noise_flips: int = 28, flips: int = 28, noise_hard: int = 0, hard: int = 1, noise_floor: bool = True,
            adapter: str = "") -> list[dict]:
    """Per minute, for each comparison: compared sequences and tokens, KL sum (nats),
    top-1 flips and hard sequences. Defaults: bf16 noise (~8.6e-4 nats/token, 2% flips)."""
    sides = {"candidate": (noise_kl * kl_times, flips, hard)}
    if noise_floor:
        sides["noise_floor"] = (noise_kl, noise_flips, noise_hard)
    series = [counter("shadow_samples_total", 'outcome="compared"', sequences, adapter)]
    for comparison, (kl, different, hard_count) in sides.items():
        c = f'comparison="{comparison}"'
        series += [counter(name, labels, per_minute, adapter) for name, labels, per_minute in (
            ("shadow_token_kl_divergence_sum", c, kl),
            ("shadow_token_kl_divergence_count", c, tokens),
            ("shadow_compared_sequence_tokens_count", c, sequences),
            ("shadow_tokens_total", f'{c},top1="different"', different),
            ("shadow_tokens_total", f'{c},top1="same"', tokens - different),
            ("shadow_sequences_total", f'{c},result="hard"', hard_count),
            ("shadow_sequences_total", f'{c},result="near_tie"', sequences // 2),
            ("shadow_sequences_total", f'{c},result="identical"', sequences - sequences // 2 - hard_count),
        )]
    return series


def verdict(*replicas: tuple[int, int], adapter: str = "") -> list[dict]:
    """The server's verdict gauges, per replica: (state, different) for 40 minutes; a
    state may change at minute 20 as (before, after)."""
    series = []
    for n, (state, different) in enumerate(replicas):
        pod = f'pod="candidate-{n}"'
        values = f"{state[0]}x19 {state[1]}x20" if isinstance(state, tuple) else f"{state}x{MINUTES}"
        series += [{"series": f"shadow_verdict_state{{{of(adapter)},{pod}}}", "values": values},
                   {"series": f"shadow_verdict_different{{{of(adapter)},{pod}}}", "values": f"{different}x{MINUTES}"}]
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


# --- LoRA adapters: one verdict each, never pooled ---------------------------------------

GROUPING = re.compile(r"\b(by|on|without|ignoring)\s*\(([^)]*)\)")


# Alerts on the reference itself, not on an adapter's numbers: summarised per (model, variant).
REFERENCE_WIDE = {"ShadowReferenceDown"}


def test_every_grouping_that_keeps_model_keeps_adapter():
    """Every `by (...)` / `on (...)` of the rules that keeps `model` keeps `adapter` too, and
    no aggregation runs without a `by`: a rule never pools adapters (the reference's own
    availability, the same for all of them, aside)."""
    rules = [r for g in rule_groups(render())["groups"] for r in g["rules"]]
    wide = [r for r in rules if r.get("alert") in REFERENCE_WIDE]
    assert [GROUPING.findall(r["expr"]) for r in wide] == [[("by", "model, variant")]]
    rules = [r for r in rules if r not in wide]
    clauses = [(r.get("record") or r["alert"], m.group(0)) for r in rules for m in GROUPING.finditer(r["expr"])]
    with_model = [(name, c) for name, c in clauses if re.search(r"\bmodel\b", c)]
    # 13 in the verdict's statistics, 1 in the verdict state, 10 in the alerts: all keep model
    assert len(with_model) == len(clauses) >= 24, clauses
    for name, clause in with_model:
        assert re.search(r"\badapter\b", clause), (name, clause)
    for rule in rules:
        assert not re.search(r"\b(sum|min|max|avg|count)\s*\(", rule["expr"]), (rule.get("record") or rule["alert"])
    summaries = {r["alert"]: r["annotations"]["summary"] for r in rules if "alert" in r}
    assert len(summaries) == 5
    for name, summary in summaries.items():
        assert "{{ if $labels.adapter }} adapter {{ $labels.adapter }}{{ end }}" in summary, name


def test_one_adapters_proven_fail_is_its_own_and_fails_the_default_gate(promtool, rules_file, tmp_path):
    """The base model passes; adapter tenant-a proves a fail at minute 20 on one replica
    (and is detectably different). ShadowVerdictFail fires for tenant-a alone (the warning
    is suppressed for it by its fail); the recording rules keep the two apart; the default
    gate (analysis.adapter null) reads the fail, a gate on the base model ("") reads its
    pass, a gate on tenant-a its fail."""
    tenant = 'adapter="tenant-a"'
    series = (traffic() + verdict((1, 0), (1, 0))
              + traffic(kl_times=5.0, adapter="tenant-a") + verdict((1, 1), ((0, -1), 1), adapter="tenant-a"))
    checks = [
        {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "30m", "exp_samples": [{
            "labels": f'ALERTS{{alertname="ShadowVerdictFail",alertstate="firing",severity="critical",{LABELS},{tenant}}}',
            "value": 1}]},
        {"expr": "round(10 * shadow:kl_noise_ratio:rate10m)", "eval_time": "30m", "exp_samples": [
            {"labels": f"{{{LABELS}}}", "value": 10}, {"labels": f"{{{LABELS},{tenant}}}", "value": 50}]},
        {"expr": "shadow:verdict_state:min + 0", "eval_time": "30m", "exp_samples": [
            {"labels": f"{{{LABELS}}}", "value": 1}, {"labels": f"{{{LABELS},{tenant}}}", "value": -1}]},
    ]
    for adapter, value in ((None, -1), ("", 1), ("tenant-a", -1)):
        checks.append(gate_value(gate_queries(adapter=adapter), value))
    out = run_promtool(promtool, rules_file, [{"interval": "1m", "input_series": series, "promql_expr_test": checks}],
                       tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_default_gate_passes_only_when_every_adapter_has(promtool, rules_file, tmp_path):
    """The base model passes and tenant-a is still undecided: the default gate waits (0),
    a gate on the base model passes (1), a gate on tenant-a waits, and a gate on an adapter
    with no series yet reads 0 (undecided, not an error)."""
    series = (traffic() + verdict((1, 0), (1, 0))
              + traffic(adapter="tenant-a") + verdict((1, 0), (0, 0), adapter="tenant-a"))
    checks = [gate_value(gate_queries(adapter=adapter), value)
              for adapter, value in ((None, 0), ("", 1), ("tenant-a", 0), ("tenant-b", 0))]
    out = run_promtool(promtool, rules_file, [{"interval": "1m", "input_series": series, "promql_expr_test": checks}],
                       tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alerts_name_the_adapter_and_never_pool_adapters(promtool, rules_file, tmp_path):
    """tenant-a drops 20% of its samples, the base model none (pooled: 10%, not above the
    limit); the base model's reference errors on 10%, tenant-a's on none. Each alert fires
    for its own adapter alone, its summary naming the adapter (the base model's none)."""
    rules = {r["alert"]: r for g in rule_groups(render())["groups"] for r in g["rules"] if "alert" in r}
    samples = [
        {"series": f'shadow_samples_total{{{of(adapter)},outcome="{o}"}}', "values": f"0+{n}x{MINUTES}"}
        for adapter, outcomes in (("", (("compared", 90), ("error", 10))), ("tenant-a", (("compared", 80), ("dropped", 20))))
        for o, n in outcomes
    ]
    expected = (("ShadowSamplesDropped", {"adapter": "tenant-a"},
                 "candidate adapter tenant-a (canary): 20% of shadow samples dropped"),
                ("ShadowReferenceErrors", {}, "candidate (canary): 10% of shadow samples fail on the reference"))
    test = {"interval": "1m", "input_series": samples, "alert_rule_test": [
        {"eval_time": "30m", "alertname": name, "exp_alerts": [{
            "exp_labels": {"severity": "warning", "model": "candidate", "variant": "canary", **labels},
            "exp_annotations": {"summary": summary, "description": rules[name]["annotations"]["description"]}}]}
        for name, labels, summary in expected
    ]}
    out = run_promtool(promtool, rules_file, [test], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the reference's availability ----------------------------------------------------------


def up(replica: int, values: str, adapter: str = "", variant: str = "canary") -> dict:
    """One candidate replica's shadow_reference_up (each adapter's series carries it too)."""
    labels = f'model="candidate",variant="{variant}",reference="reference",pod="candidate-{replica}"'
    if adapter:
        labels += f',adapter="{adapter}"'
    return {"series": f"shadow_reference_up{{{labels}}}", "values": values}


def reference_down(eval_time: str, *variants: str) -> dict:
    rules = {r["alert"]: r for g in rule_groups(render())["groups"] for r in g["rules"] if "alert" in r}
    return {"eval_time": eval_time, "alertname": "ShadowReferenceDown", "exp_alerts": [{
        "exp_labels": {"severity": "warning", "model": "candidate", "variant": variant},
        "exp_annotations": {"summary": f"candidate ({variant}): the shadow's reference does not answer",
                            "description": rules["ShadowReferenceDown"]["annotations"]["description"]}}
        for variant in variants]}


def test_a_reference_that_stays_down_alerts_once_per_model_and_variant(promtool, rules_file, tmp_path):
    """The canary's replica 1 loses the reference at minute 10 (its base model's and its
    adapter's series both read 0), replica 0 still reaches it: one replica cut off is enough,
    one alert for (model, variant), none per adapter, after `referenceDownFor` (5m) and not
    before. The stable release's candidates, up throughout, trip nothing."""
    series = [up(0, f"1x{MINUTES}"), up(0, f"1x{MINUTES}", adapter="tenant-a"),
              up(1, f"1x9 0x{MINUTES - 9}"), up(1, f"1x9 0x{MINUTES - 9}", adapter="tenant-a"),
              up(0, f"1x{MINUTES}", variant="stable")]
    test = {"interval": "1m", "input_series": series, "alert_rule_test": [
        reference_down("13m"),  # 0 for 3 minutes: pending, not firing
        reference_down("30m", "canary"),
    ]}
    out = run_promtool(promtool, rules_file, [test], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_reference_restart_shorter_than_the_wait_does_not_alert(promtool, rules_file, tmp_path):
    """Up (1) throughout: nothing. Down for 4 minutes (minutes 10 to 13) while a reference
    pod restarts, then up again: the samples waited and were retried, and nothing fires."""
    steady = {"interval": "1m", "input_series": [up(0, f"1x{MINUTES}"), up(1, f"1x{MINUTES}")],
              "alert_rule_test": [reference_down(f"{m}m") for m in (10, 30)]}
    restart = {"interval": "1m", "input_series": [up(0, f"1x9 0x3 1x{MINUTES - 12}")],
               "alert_rule_test": [reference_down(f"{m}m") for m in (11, 14, 20)]}
    out = run_promtool(promtool, rules_file, [steady, restart], tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
