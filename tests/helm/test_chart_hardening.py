"""The chart's hardening: a bearer token between candidate and reference by default (random,
kept across upgrades), a NetworkPolicy in front of the reference, and a candidate that
leaves its Service before it drains, within its grace period."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.helm.chart import CANARY_VALUES, CHART, as_k8s, by_kind, deployment, render


def env(docs: list[dict], component: str) -> dict[str, dict]:
    return {e["name"]: e for e in deployment(docs, component)["spec"]["template"]["spec"]["containers"][0]["env"]}


def secret_data(docs: list[dict]) -> dict:
    (secret,) = by_kind(docs, "Secret")
    return secret["stringData"]


# --- the reference token -----------------------------------------------------------------


def test_the_reference_gets_a_random_token_by_default():
    first, second = render(), render()
    token = secret_data(first)["reference-token"]
    assert re.fullmatch(r"[A-Za-z0-9]{32}", token)
    assert secret_data(second)["reference-token"] != token  # random per install (no cluster to read back from)
    reference = env(first, "reference")["SHADOWSERVE_REFERENCE_TOKENS"]["valueFrom"]["secretKeyRef"]
    assert reference == {"name": "shadowserve-stable-keys", "key": "reference-token"}  # required: not optional
    candidate = env(first, "candidate")["SHADOWSERVE_SHADOW_REFERENCE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (candidate["name"], candidate["key"]) == ("shadowserve-stable-keys", "reference-token")


def test_a_token_given_in_the_values_is_used():
    assert secret_data(render({"secret": {"referenceToken": "mine"}}))["reference-token"] == "mine"


def test_the_secret_reads_back_the_token_of_an_earlier_install():
    assert 'lookup "v1" "Secret" .Release.Namespace (include "shadowserve.secretName" .)' in (
        CHART / "templates" / "secret.yaml").read_text()


@pytest.fixture(scope="module")
def probe_chart(tmp_path_factory):
    """The chart plus a template feeding the token helper what `lookup` returns for an
    existing Secret (a render contacts no cluster, so `lookup` itself returns nothing)."""
    chart = tmp_path_factory.mktemp("chart") / "shadowserve"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-probe.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\ndata:\n"
        '  existing: {{ include "shadowserve.referenceToken" (merge (dict "existing" (dict "data" '
        '(dict "reference-token" (b64enc "kept-token")))) .) | quote }}\n'
        '  none: {{ include "shadowserve.referenceToken" (merge (dict "existing" (dict)) .) | quote }}\n'
    )
    return chart


def render_probe(chart, values: dict) -> dict:
    import yaml
    from helm_python import Chart

    loaded = Chart.load(str(chart))
    try:
        files = loaded.render(values, name="shadowserve-stable", namespace="llm", is_upgrade=True)
    finally:
        loaded.close()
    docs = [doc for text in files.values() for doc in yaml.safe_load_all(text) if doc]
    return next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "probe")["data"]


def test_an_upgrade_keeps_the_existing_token_and_a_given_one_wins(probe_chart):
    data = render_probe(probe_chart, {})
    assert data["existing"] == "kept-token" and re.fullmatch(r"[A-Za-z0-9]{32}", data["none"])
    assert render_probe(probe_chart, {"secret": {"referenceToken": "mine"}}) == {"existing": "mine", "none": "mine"}


def test_an_existing_secret_supplies_the_token():
    docs = render({"secret": {"existingReferenceTokenSecret": "shared-token"}})
    assert "reference-token" not in secret_data(docs)
    assert env(docs, "reference")["SHADOWSERVE_REFERENCE_TOKENS"]["valueFrom"]["secretKeyRef"]["name"] == "shared-token"
    assert env(docs, "candidate")["SHADOWSERVE_SHADOW_REFERENCE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == \
        "shared-token"


def test_the_canary_uses_the_stable_reference_token():
    docs = render(CANARY_VALUES, name="shadowserve-canary")
    assert "reference-token" not in secret_data(docs)
    ref = env(docs, "candidate")["SHADOWSERVE_SHADOW_REFERENCE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("shadowserve-stable-keys", "reference-token")


def test_no_token_is_made_up_for_an_external_reference():
    docs = render({"reference": {"enabled": False, "externalUrl": "http://elsewhere:8001"}})
    assert secret_data(docs)["reference-token"] == ""


# --- the NetworkPolicy -------------------------------------------------------------------


def test_only_candidates_reach_the_reference_port():
    docs = render({"reference": {"port": 9001}})
    (policy,) = by_kind(docs, "NetworkPolicy")
    typed = as_k8s(policy)
    assert typed.spec.pod_selector.match_labels == {
        "app.kubernetes.io/name": "shadowserve", "app.kubernetes.io/instance": "shadowserve-stable",
        "app.kubernetes.io/component": "reference"}
    assert typed.spec.policy_types == ["Ingress"]
    (rule,) = typed.spec.ingress
    assert [(p.port, p.protocol) for p in rule.ports] == [(9001, "TCP")]
    candidates = rule._from[0]
    assert candidates.pod_selector.match_labels == {"app.kubernetes.io/name": "shadowserve",
                                                    "app.kubernetes.io/component": "candidate"}
    assert candidates.namespace_selector is None  # this namespace only
    # and what the candidate pods carry matches it
    labels = deployment(docs, "candidate")["spec"]["template"]["metadata"]["labels"]
    assert candidates.pod_selector.match_labels.items() <= labels.items()
    # Prometheus (scraping the reference's /metrics on that port) is the one extra peer by default
    assert rule._from[1].namespace_selector.match_labels == {"kubernetes.io/metadata.name": "monitoring"}


def test_the_network_policy_toggles():
    assert by_kind(render({"reference": {"networkPolicy": {"enabled": False}}}), "NetworkPolicy") == []
    assert by_kind(render(CANARY_VALUES, name="shadowserve-canary"), "NetworkPolicy") == []  # no reference here
    (policy,) = by_kind(render({"reference": {"networkPolicy": {"extraFrom": []}}}), "NetworkPolicy")
    assert len(policy["spec"]["ingress"][0]["from"]) == 1


def test_the_reference_gets_its_token_caps():
    args = deployment(render({"reference": {"maxItemTokens": 16384}}), "reference")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--max-item-tokens=16384" in args and "--max-request-tokens=32768" in args


# --- the candidate's shutdown --------------------------------------------------------------


def pod(docs: list[dict]):
    return as_k8s(deployment(docs, "candidate")).spec.template.spec


def test_the_candidate_leaves_its_service_then_drains_within_the_grace_period():
    spec = pod(render())
    (container,) = spec.containers
    assert spec.termination_grace_period_seconds == 60
    assert container.lifecycle.pre_stop._exec.command == ["sleep", "5"]
    assert {e.name: e.value for e in container.env}["SHADOWSERVE_SHUTDOWN_GRACE_S"] == "35"  # 60 - 5 - 10 (shadow drain) - 10

    spec = pod(render({"candidate": {"terminationGracePeriodSeconds": 120, "preStopSleepSeconds": 10}}))
    assert spec.termination_grace_period_seconds == 120
    assert spec.containers[0].lifecycle.pre_stop._exec.command == ["sleep", "10"]
    assert {e.name: e.value for e in spec.containers[0].env}["SHADOWSERVE_SHUTDOWN_GRACE_S"] == "90"  # 120 - 10 - 10 - 10

    spec = pod(render({"candidate": {"preStopSleepSeconds": 0}}))
    assert spec.containers[0].lifecycle is None
    assert {e.name: e.value for e in spec.containers[0].env}["SHADOWSERVE_SHUTDOWN_GRACE_S"] == "40"
    assert "--shadow-drain-s=10" in spec.containers[0].args and "--shadow-max-duty=1" in spec.containers[0].args


def test_a_grace_period_shorter_than_the_pre_stop_sleep_is_refused():
    from helm_python import HelmError, HelmValuesError

    with pytest.raises(HelmError, match="terminationGracePeriodSeconds must be at least"):
        render({"candidate": {"terminationGracePeriodSeconds": 24, "preStopSleepSeconds": 5}})
    with pytest.raises(HelmValuesError, match="/candidate/preStopSleepSeconds"):
        render({"candidate": {"preStopSleepSeconds": -1}})


@pytest.mark.parametrize("values", [
    {"secret": {"referenceToken": "t"}},
    {"reference": {"networkPolicy": {"enabled": False}}},
    {"candidate": {"terminationGracePeriodSeconds": 30, "preStopSleepSeconds": 0}},
])
def test_lint_is_clean_with_the_new_values(values):
    from helm_python import lint

    result = lint(str(CHART), values, strict=True)
    assert result["errors"] == [], result
