"""The chart, rendered and linted with the Helm SDK; manifests parse as Kubernetes objects."""

from __future__ import annotations

import json
import re

import pytest

from shadow.calibration import load_calibration
from tests.helm.chart import CANARY_VALUES, CHART, CORE, as_k8s, by_kind, dashboard, deployment, render
from tests.helm.crd_models import RelabelConfig, ScaledObject

CUSTOM = {"ServiceMonitor", "PrometheusRule", "AnalysisTemplate", "MetricTemplate", "ScaledObject"}


@pytest.fixture(scope="module")
def stable():
    return render()


@pytest.fixture(scope="module")
def canary():
    return render(CANARY_VALUES, name="shadowserve-canary")


ADAPTER_CANARY = {**CANARY_VALUES, "analysis": {**CANARY_VALUES["analysis"], "adapter": "tenant-a", "strict": True}}


@pytest.mark.parametrize("values", [{}, CANARY_VALUES, ADAPTER_CANARY], ids=["default", "canary", "canary-adapter"])
def test_lint_is_clean(values):
    from helm_python import lint

    result = lint(str(CHART), values, strict=True)
    assert result["errors"] == [], result


def test_default_release_has_every_piece(stable):
    kinds = sorted(d["kind"] for d in stable)
    assert kinds == sorted(["Deployment", "Deployment", "Service", "Service", "ScaledObject", "Secret",
                            "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "ConfigMap"])
    for doc in stable:
        assert doc["apiVersion"] and doc["metadata"]["name"].startswith("shadowserve-stable")
        if doc["kind"] in CORE:
            assert as_k8s(doc).metadata.name == doc["metadata"]["name"]
        else:
            assert doc["kind"] in CUSTOM and "spec" in doc


def test_candidate_deployment(stable):
    candidate = as_k8s(deployment(stable, "candidate"))
    container = candidate.spec.template.spec.containers[0]
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert container.readiness_probe.http_get.path == "/health"
    assert container.startup_probe.http_get.path == "/health"
    assert container.startup_probe.period_seconds * container.startup_probe.failure_threshold >= 600
    assert candidate.spec.template.spec.volumes[0].persistent_volume_claim.claim_name == "models"
    # vLLM's engine processes talk through /dev/shm: a container's 64 MiB default stopped
    # the engine in the CPU image ("160 MiB required, 62 MiB free").
    shm = next(v for v in candidate.spec.template.spec.volumes if v.name == "shm")
    assert (shm.empty_dir.medium, shm.empty_dir.size_limit) == ("Memory", "1Gi")
    assert any(m.name == "shm" and m.mount_path == "/dev/shm" for m in container.volume_mounts)
    args = container.args
    assert args[0] == "serve" and "--shadow-labels=variant=stable" in args
    assert "--shadow-reference-url=http://shadowserve-stable-reference:8001" in args
    assert {e.name for e in container.env} == {"SHADOWSERVE_API_KEYS", "SHADOWSERVE_SHADOW_REFERENCE_TOKEN",
                                               "SHADOWSERVE_SHUTDOWN_GRACE_S"}


REFERENCE_TOKEN = "SHADOWSERVE_SHADOW_REFERENCE_TOKEN"


def candidate_container(docs: list[dict]) -> dict:
    return deployment(docs, "candidate")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("shadow, on", [
    ({"rate": 0}, False),
    ({"rate": 0.0, "allowHeader": False}, False),
    ({"rate": 0.05}, True),
    ({"rate": 0, "allowHeader": True}, True),  # the X-Shadow header alone turns it on
], ids=["rate-0", "rate-0.0", "rate-0.05", "header-only"])
def test_reference_flags_only_while_the_shadow_is_on(shadow, on):
    """`serve` refuses to start (exit 2) on any --shadow-reference-* flag, or the reference
    token, while the shadow is off: the chart gives them only while it is on. Checked with
    the server's own settings: the flags the chart renders, parsed by the real command line."""
    from server.cli import cli_source
    from shadow.settings import ShadowSettings

    values = {"candidate": {"shadow": shadow}, "verdict": {"calibration": "{}"},  # calibration: --shadow-reference-name
              "adapters": {"modules": [{"name": "t", "path": "/adapters/t", "referencePath": "/adapters/t-trained"}]}}
    container = candidate_container(render(values))
    args, env = container["args"], {e["name"] for e in container["env"]}
    given = [a for a in args if a.startswith("--shadow-reference-")]
    assert bool(given) == on and (REFERENCE_TOKEN in env) == on, (given, env)
    if on:
        assert {a.split("=", 1)[0] for a in given} == {"--shadow-reference-url", "--shadow-reference-name",
                                                      "--shadow-reference-lora-modules"}
    parsed = {key.removeprefix("serve."): value
              for key, value in vars(cli_source(cli_exit_on_error=False).root_parser.parse_args(args)).items()}
    what_decides = ("shadow_rate", "shadow_allow_header", *[k for k in parsed if k.startswith("shadow_reference_")])
    settings = ShadowSettings(**{key: parsed[key] for key in what_decides if parsed.get(key) is not None},
                              **({"shadow_reference_token": "from-the-secret"} if REFERENCE_TOKEN in env else {}))
    assert settings.shadow_enabled == on
    assert bool(settings.reference_flags_given()) == on  # off: nothing for `serve` to refuse


def test_reference_runs_in_its_own_deployment_scaled_by_keda_on_shadow_load(stable):
    reference = as_k8s(deployment(stable, "reference"))
    assert reference.spec.template.spec.containers[0].args[0] == "reference"
    assert reference.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert reference.spec.replicas is None  # the autoscaler owns it
    (doc,) = by_kind(stable, "ScaledObject")
    scaled = ScaledObject.model_validate(doc)
    assert scaled.spec.scaleTargetRef.name == "shadowserve-stable-reference"
    assert (scaled.spec.minReplicaCount, scaled.spec.maxReplicaCount) == (1, 4)
    triggers = {t.name: t.metadata for t in scaled.spec.triggers}
    assert triggers["shadow-queue-depth"] == {"serverAddress": "http://prometheus-operated.monitoring:9090",
                                              "query": 'sum(shadow_queue_depth{model="candidate"})', "threshold": "32"}
    assert triggers["shadow-dropped-rate"]["query"] == \
        'sum(rate(shadow_samples_total{model="candidate",outcome="dropped"}[2m]))'
    assert by_kind(stable, "HorizontalPodAutoscaler") == []


def test_keda_settings_and_the_cpu_fallback():
    custom = render({"reference": {"autoscaling": {"keda": {"prometheusAddress": "http://prom:9090",
                                                            "queueDepthPerReplica": 8, "droppedPerSecond": 0.5}}}})
    scaled = ScaledObject.model_validate(by_kind(custom, "ScaledObject")[0])
    assert {t.metadata["serverAddress"] for t in scaled.spec.triggers} == {"http://prom:9090"}
    assert [t.metadata["threshold"] for t in scaled.spec.triggers] == ["8", "0.5"]
    fallback = render({"reference": {"autoscaling": {"mode": "hpa"}}})
    assert by_kind(fallback, "ScaledObject") == []
    hpa = as_k8s(by_kind(fallback, "HorizontalPodAutoscaler")[0])
    assert hpa.spec.scale_target_ref.name == "shadowserve-stable-reference" and hpa.spec.max_replicas == 4
    off = render({"reference": {"autoscaling": {"enabled": False}}})
    assert not by_kind(off, "ScaledObject") and not by_kind(off, "HorizontalPodAutoscaler")


def test_the_crd_models_can_fail():
    """The typed ScaledObject refuses what KEDA's CRD refuses (a number in trigger metadata)."""
    from pydantic import ValidationError

    doc = by_kind(render(), "ScaledObject")[0]
    doc["spec"]["triggers"][0]["metadata"]["threshold"] = 32
    with pytest.raises(ValidationError):
        ScaledObject.model_validate(doc)
    with pytest.raises(ValidationError):
        RelabelConfig.model_validate({"action": "rename"})


def test_monitoring_objects(stable):
    (monitor,) = by_kind(stable, "ServiceMonitor")
    endpoint = monitor["spec"]["endpoints"][0]
    assert {k: endpoint[k] for k in ("port", "path", "interval")} == {"port": "http", "path": "/metrics", "interval": "15s"}
    (relabel,) = [RelabelConfig.model_validate(r) for r in endpoint["metricRelabelings"]]
    assert relabel.targetLabel == "variant" and relabel.replacement == "stable"
    (config_map,) = by_kind(stable, "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = dashboard(stable)
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "model", "variant", "adapter"}
    titles = " | ".join(p["title"] for p in board["panels"])
    for needle in ("Verdict: token KL, candidate over noise floor", "excess top-1", "excess hard", "First divergence",
                   "P(diverged by position N)", "KL", "Δp", "drift", "Same top-1", "Hard vs near-tie", "queue",
                   "Reference latency", "Reference up", "Reference retries", "Serving latency", "Serving throughput"):
        assert needle.lower() in titles.lower(), needle
    # Candidate and noise floor side by side: split by `comparison` wherever a comparison series is drawn.
    for title in ("Same top-1 rate", "P(diverged by position N)", "Token KL(ref || ·): mean and quantiles"):
        panel = next(p for p in board["panels"] if p["title"] == title)
        assert all("comparison" in t["expr"] for t in panel["targets"]), title


SHADOW_SELECTOR = re.compile(r"\bshadow_[a-z_]+(\{[^}]*\})?")
# Whether a replica reaches its reference is one fact for all its adapters: these series
# carry `adapter` like every shadow series, all at one value, so their panel splits by
# (model, variant) alone.
REFERENCE_WIDE = {"shadow_reference_up"}


def test_the_dashboard_selects_and_splits_by_adapter(stable):
    """An `adapter` variable (All: `.*`, which matches the base model's label-less series);
    every shadow series a panel reads is filtered by it; wherever a panel splits by variant it
    splits by adapter too (one verdict per adapter, never pooled), legend included, except
    the reference's availability, the same for every adapter. vLLM's series have no adapter:
    the serving panels are not filtered by it."""
    board = dashboard(stable)
    (adapter,) = [v for v in board["templating"]["list"] if v["name"] == "adapter"]
    assert (adapter["type"], adapter["multi"], adapter["includeAll"], adapter["allValue"]) == ("query", True, True, ".*")
    assert re.fullmatch(r"label_values\(shadow_[a-z_]+\{[^}]*model=~\"\$model\"[^}]*\}, adapter\)",
                        adapter["query"]["query"]), adapter
    shadow = vllm = 0
    for panel in board["panels"]:
        for target in panel["targets"]:
            expr, legend = target["expr"], target["legendFormat"]
            if "vllm:" in expr:
                vllm += 1
                assert "adapter" not in expr and "adapter" not in legend, expr
                continue
            selectors = [m.group(0) for m in SHADOW_SELECTOR.finditer(expr)]
            assert selectors, expr
            shadow += len(selectors)
            for selector in selectors:
                assert 'adapter=~"$adapter"' in selector, (panel["title"], selector)
            reference_wide = {s.split("{")[0] for s in selectors} <= REFERENCE_WIDE
            for clause in re.findall(r"\bby \(([^)]*)\)", expr):
                labels = {label.strip() for label in clause.split(",")}
                if reference_wide:
                    assert labels == {"model", "variant"} and "adapter" not in legend, (panel["title"], clause)
                    continue
                assert "variant" not in labels or "adapter" in labels, (panel["title"], clause)
                if "variant" in labels:
                    assert "{{variant}} {{adapter}}" in legend, (panel["title"], legend)
    assert shadow >= 50 and vllm == 6  # every panel's, not a few
    verdict = board["panels"][0]["targets"][0]["expr"]
    assert verdict.startswith("min by (model, variant, adapter) (shadow_verdict_state{")


def test_the_dashboard_and_its_docs_are_what_the_generator_writes():
    """helm/dashboard.py is the one source of the dashboard JSON and of the docs' panel table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dashboard", CHART.parent / "dashboard.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    board = generator.dashboard()
    assert json.loads(generator.DASHBOARD.read_text()) == board, "run `python helm/dashboard.py`"
    assert generator.render_docs(generator.DOCS.read_text(), board) == generator.DOCS.read_text(), \
        "run `python helm/dashboard.py`"


def test_canary_release(canary):
    kinds = sorted(d["kind"] for d in canary)
    assert kinds == sorted(["Deployment", "Service", "Secret", "ServiceMonitor", "AnalysisTemplate", "MetricTemplate"])
    candidate = as_k8s(by_kind(canary, "Deployment")[0]).spec.template.spec.containers[0]
    assert "--shadow-labels=variant=canary" in candidate.args
    assert "--shadow-reference-url=http://shadowserve-stable-reference:8001" in candidate.args
    assert "--shadow-noise-floor=true" in candidate.args and "--verdict-kl-ratio-max=2" in candidate.args
    (analysis,) = by_kind(canary, "AnalysisTemplate")
    conditions = {m["name"]: (m["successCondition"], m["failureCondition"]) for m in analysis["spec"]["metrics"]}
    # The server's own verdict (1 pass, 0 undecided, -1 fail): an undecided one meets neither.
    assert conditions == {"verdict": ("result[0] == 1", "result[0] == -1")}
    (metric,) = analysis["spec"]["metrics"]
    query = metric["provider"]["prometheus"]["query"]
    assert query.startswith("min(shadow_verdict_state{") and 'variant="canary"' in query and "vector(0)" in query
    (flagger,) = by_kind(canary, "MetricTemplate")
    assert flagger["metadata"]["name"] == "shadowserve-canary-verdict" and flagger["spec"]["query"] == query


def test_a_strict_canary_also_gates_on_detectable_difference():
    docs = render({**CANARY_VALUES, "analysis": {**CANARY_VALUES["analysis"], "strict": True}}, name="shadowserve-canary")
    (analysis,) = by_kind(docs, "AnalysisTemplate")
    conditions = {m["name"]: (m["successCondition"], m["failureCondition"]) for m in analysis["spec"]["metrics"]}
    assert conditions["detectably-different"] == ("result[0] == 0", "result[0] == 1")
    assert len(by_kind(docs, "MetricTemplate")) == 2


def gate_docs(**analysis) -> list[dict]:
    values = {**CANARY_VALUES, "analysis": {**CANARY_VALUES["analysis"], "strict": True, **analysis}}
    return render(values, name="shadowserve-canary")


def gate_queries(docs: list[dict]) -> dict[str, str]:
    """Every gate query, Argo's and Flagger's, by where it lives."""
    queries = {f"argo {m['name']}": m["provider"]["prometheus"]["query"]
               for t in by_kind(docs, "AnalysisTemplate") for m in t["spec"]["metrics"]}
    queries.update({f"flagger {t['metadata']['name']}": t["spec"]["query"] for t in by_kind(docs, "MetricTemplate")})
    return queries


SELECTORS = re.compile(r"\bshadow_[a-z_]+\{([^}]*)\}")


@pytest.mark.parametrize("noise_floor", [True, False], ids=["verdict", "fallback"])
@pytest.mark.parametrize("adapter, matcher", [("tenant-a", 'adapter="tenant-a"'), ("", 'adapter=""')],
                         ids=["tenant-a", "base"])
def test_a_gate_on_one_adapter_selects_its_series_alone(adapter, matcher, noise_floor):
    queries = gate_queries(gate_docs(adapter=adapter, noiseFloor=noise_floor))
    assert len(queries) == (4 if noise_floor else 2), queries
    for where, query in queries.items():
        selectors = SELECTORS.findall(query)
        assert selectors, (where, query)
        for selector in selectors:
            assert selector.startswith(f'model="candidate",variant="canary",{matcher}'), (where, query)


@pytest.mark.parametrize("analysis", [{}, {"adapter": None}], ids=["default", "null"])
def test_the_default_gate_reads_every_adapter_together(analysis):
    """null (the default): no adapter selection; the verdict's min (and `different`'s max)
    runs over replicas and adapters alike: one adapter's proven fail is a fail."""
    queries = gate_queries(gate_docs(**analysis))
    assert queries == {
        "argo verdict": 'min(shadow_verdict_state{model="candidate",variant="canary"}) or on () vector(0)',
        "argo detectably-different": 'max(shadow_verdict_different{model="candidate",variant="canary"}) or on () vector(0)',
        "flagger shadowserve-canary-verdict":
            'min(shadow_verdict_state{model="candidate",variant="canary"}) or on () vector(0)',
        "flagger shadowserve-canary-detectably-different":
            'max(shadow_verdict_different{model="candidate",variant="canary"}) or on () vector(0)',
    }
    fallback = gate_queries(gate_docs(noiseFloor=False, **analysis))
    assert len(fallback) == 2
    for where, query in fallback.items():
        assert "adapter=" not in query, where
        # the worst adapter's ratio, not a pool of all adapters' sequences
        assert query.strip().startswith("max(") and query.count("sum by (adapter) (") == 2, (where, query)


def test_the_absolute_gates_are_only_a_fallback():
    docs = render({**CANARY_VALUES, "analysis": {"enabled": True, "noiseFloor": False}}, name="shadowserve-canary")
    (analysis,) = by_kind(docs, "AnalysisTemplate")
    assert {m["name"]: m["successCondition"] for m in analysis["spec"]["metrics"]} == {
        "hard-divergence-ratio": "result[0] <= 0.02", "mean-token-kl": "result[0] <= 0.01"}
    assert by_kind(docs, "MetricTemplate") == []


def test_the_reference_computes_the_noise_floor_in_the_serving_dtype(stable):
    reference = deployment(stable, "reference")
    assert "--noise-dtype=bfloat16" in reference["spec"]["template"]["spec"]["containers"][0]["args"]
    fp16 = render({"candidate": {"dtype": "float16"}})
    reference = deployment(fp16, "reference")
    assert "--noise-dtype=float16" in reference["spec"]["template"]["spec"]["containers"][0]["args"]


BAD_VALUES = [
    ({"candidate": {"shadow": {"rate": 2}}}, "/candidate/shadow/rate"),
    ({"variant": "Canary!"}, "/variant"),
    ({"candidate": {"dtype": "int3"}}, "/candidate/dtype"),
    ({"candidate": {"port": 70000}}, "/candidate/port"),
    ({"prometheusRule": {"fallbackHardDivergenceRatio": -0.1}}, "/prometheusRule/fallbackHardDivergenceRatio"),
    ({"prometheusRule": {"hardDivergenceRatio": 0.05}}, "/prometheusRule"),  # the old absolute key, gone
    ({"verdict": {"excessTop1Max": 1.5}}, "/verdict/excessTop1Max"),
    ({"verdict": {"klRatioMax": 0}}, "/verdict/klRatioMax"),
    ({"prometheusRule": {"window": "ten minutes"}}, "/prometheusRule/window"),
    ({"analysis": {"prometheusAddress": "prometheus:9090"}}, "/analysis/prometheusAddress"),
    ({"candidate": {"modelVolume": {"claimName": "", "path": "/m"}}}, "/candidate/modelVolume/claimName"),
    ({"candidate": {"shmSize": "lots"}}, "/candidate/shmSize"),
    ({"analysis": {"adapter": 5}}, "/analysis/adapter"),
    ({"analysis": {"adapter": ["tenant-a"]}}, "/analysis/adapter"),
    ({"candidate": {"shadow": {"maxSampleAgeSeconds": 0}}}, "/candidate/shadow/maxSampleAgeSeconds"),
    ({"prometheusRule": {"referenceDownFor": "5 minutes"}}, "/prometheusRule/referenceDownFor"),
]


@pytest.mark.parametrize("values, where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_schema_rejects_bad_values(values, where):
    from helm_python import HelmValuesError

    with pytest.raises(HelmValuesError, match=where):
        render(values)


def test_an_auto_dtype_cannot_give_the_reference_its_noise_floor_dtype():
    from helm_python import HelmError

    with pytest.raises(HelmError, match="candidate.dtype must be explicit"):
        render({"candidate": {"dtype": "auto"}})
    assert render({"candidate": {"dtype": "auto", "shadow": {"noiseFloor": False}}})


def test_disabling_the_reference_requires_an_external_url():
    from helm_python import HelmError

    with pytest.raises(HelmError, match="reference.externalUrl is required"):
        render({"reference": {"enabled": False}})


def test_an_engine_calibration_is_mounted_and_read_by_the_candidate(tmp_path):
    from tests.verdict_streams import FACTS, calibration

    written = tmp_path / "written.json"
    calibration().save(written)  # as `verify --calibrate` writes it
    docs = render({"verdict": {"calibration": written.read_text()}})
    (config_map,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-calibration")]
    candidate = as_k8s(deployment(docs, "candidate"))
    container, pod = candidate.spec.template.spec.containers[0], candidate.spec.template.spec
    (arg,) = [a for a in container.args if a.startswith("--verdict-calibration=")]
    path = arg.split("=", 1)[1]
    (mount,) = [m for m in container.volume_mounts if m.name == "calibration"]
    (volume,) = [v for v in pod.volumes if v.name == "calibration"]
    assert path == f"{mount.mount_path}/calibration.json" and mount.read_only
    # the reference's name as its service reports it (its directory), even before it answers
    reference = deployment(docs, "reference")
    model = next(a for a in reference["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--model="))
    assert f"--shadow-reference-name={model.rsplit('/', 1)[1]}" in container.args
    assert volume.config_map.name == config_map["metadata"]["name"]
    # what the server reads from the mount is the calibration, valid for its setup
    mounted = tmp_path / "calibration.json"
    mounted.write_text(config_map["data"]["calibration.json"])
    assert load_calibration(mounted, FACTS) == calibration()
    # a new calibration rolls the pods; none leaves no trace
    other = tmp_path / "other.json"
    calibration(kl_ratio=0.9).save(other)
    rolled = render({"verdict": {"calibration": other.read_text()}})
    annotation = "checksum/calibration"
    pods = [deployment(r, "candidate")["spec"]["template"] for r in (docs, rolled, render())]
    assert pods[0]["metadata"]["annotations"][annotation] != pods[1]["metadata"]["annotations"][annotation]
    assert "annotations" not in pods[2]["metadata"]
    assert not any(a.startswith("--verdict-calibration") for a in pods[2]["spec"]["containers"][0]["args"])
