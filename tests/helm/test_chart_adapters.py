"""LoRA adapters in the chart: both pods read the adapters' directories (the candidate
serves and hashes its copy, the reference loads the path a score request names), so both
mount one adapters volume, read-only, at one path, and get the same adapters under the
same names; what either pod would refuse at start the chart refuses at render, in the
values' own terms."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.helm.chart import CANARY_VALUES, CHART, as_k8s, by_kind, deployment, render

MODULES = [
    {"name": "tenant-a", "path": "/adapters/tenant-a/v1"},
    # converted for serving; the reference scores with the adapter as trained
    {"name": "tenant-b", "path": "/adapters/tenant-b/served", "referencePath": "/adapters/tenant-b/trained"},
]


def adapters(**values) -> dict:
    return {"adapters": {"modules": MODULES, **values}}


def container(docs: list[dict], component: str):
    return as_k8s(deployment(docs, component)).spec.template.spec.containers[0]


def pod(docs: list[dict], component: str):
    return as_k8s(deployment(docs, component)).spec.template.spec


def flags(args: list[str], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(f"{flag}=")]


def test_both_pods_mount_the_adapters_volume_read_only_at_one_path():
    docs = render(adapters(volume={"claimName": "loras", "mountPath": "/mnt/loras"},
                           modules=[{"name": "tenant-a", "path": "/mnt/loras/tenant-a/v1"}]))
    mounts = {}
    for component in ("candidate", "reference"):
        spec = pod(docs, component)
        (volume,) = [v for v in spec.volumes if v.name == "adapters"]
        assert (volume.persistent_volume_claim.claim_name, volume.persistent_volume_claim.read_only) == ("loras", True)
        (mount,) = [m for m in spec.containers[0].volume_mounts if m.name == "adapters"]
        assert mount.read_only, component
        mounts[component] = mount.mount_path
    assert mounts == {"candidate": "/mnt/loras", "reference": "/mnt/loras"}


def test_both_pods_get_the_adapters_under_the_same_names():
    docs = render(adapters(maxLoras=2, maxCpuLoras=4, referenceMaxAdapters=8))
    candidate, reference = container(docs, "candidate").args, container(docs, "reference").args
    assert flags(candidate, "--lora-modules") == ["tenant-a=/adapters/tenant-a/v1", "tenant-b=/adapters/tenant-b/served"]
    # the reference mounts its own copy where one is given, and the candidate expects that copy's hash
    assert flags(reference, "--lora-modules") == ["tenant-a=/adapters/tenant-a/v1", "tenant-b=/adapters/tenant-b/trained"]
    assert flags(candidate, "--shadow-reference-lora-modules") == ["tenant-b=/adapters/tenant-b/trained"]
    assert flags(candidate, "--max-loras") == ["2"] and flags(candidate, "--max-cpu-loras") == ["4"]
    assert flags(reference, "--max-adapters") == ["8"]
    for args in (candidate, reference):  # mounted at start only: no run-time loads unless asked
        assert not any(a.startswith("--allow-runtime-lora-updating") for a in args)


def test_runtime_updating_alone_mounts_the_volume_and_opens_both_pods():
    docs = render({"adapters": {"runtimeUpdating": True}})
    for component in ("candidate", "reference"):
        c = container(docs, component)
        assert "--allow-runtime-lora-updating=true" in c.args, component
        assert not flags(c.args, "--lora-modules"), component
        assert [m.mount_path for m in c.volume_mounts if m.name == "adapters"] == ["/adapters"], component


def test_without_adapters_nothing_is_mounted_and_vllm_keeps_its_defaults():
    docs = render()
    for component in ("candidate", "reference"):
        spec = pod(docs, component)
        assert not [v for v in spec.volumes if v.name == "adapters"], component
        assert not [m for m in spec.containers[0].volume_mounts if m.name == "adapters"], component
        assert not any("lora" in a for a in spec.containers[0].args), component
    assert not any(a.startswith(("--max-loras", "--max-cpu-loras")) for a in container(docs, "candidate").args)
    assert "--max-adapters=16" in container(docs, "reference").args


def test_a_canary_on_the_shared_reference_mounts_its_adapters_too():
    """reference.enabled false: no reference here, but the candidate still mounts the
    volume (it hashes its copy; the shared reference reads the same path)."""
    values = {**CANARY_VALUES, "adapters": {"modules": [{"name": "tenant-a-v2", "path": "/adapters/tenant-a/v2"}]},
              "analysis": {**CANARY_VALUES["analysis"], "adapter": "tenant-a-v2"}}
    docs = render(values, name="shadowserve-canary")
    (only,) = by_kind(docs, "Deployment")
    c = as_k8s(only).spec.template.spec.containers[0]
    assert flags(c.args, "--lora-modules") == ["tenant-a-v2=/adapters/tenant-a/v2"]
    assert "--shadow-reference-url=http://shadowserve-stable-reference:8001" in c.args
    assert [m.mount_path for m in c.volume_mounts if m.name == "adapters"] == ["/adapters"]


def test_the_rendered_args_parse_with_the_real_command_line():
    from server.cli import cli_source

    parser = cli_source(cli_exit_on_error=False).root_parser
    docs = render(adapters(runtimeUpdating=True, maxLoras=2, maxCpuLoras=4))
    serve = vars(parser.parse_args(container(docs, "candidate").args))
    assert serve["serve.lora_modules"] == flags(container(docs, "candidate").args, "--lora-modules")
    assert serve["serve.shadow_reference_lora_modules"] == ["tenant-b=/adapters/tenant-b/trained"]
    assert serve["serve.allow_runtime_lora_updating"] == "true" and serve["serve.shadow_max_sample_age_s"] == "600"
    reference = vars(parser.parse_args(container(docs, "reference").args))
    assert len(reference["reference.lora_modules"]) == 2 and reference["reference.max_adapters"] == "16"
    assert reference["reference.allow_runtime_lora_updating"] == "true"


@pytest.mark.parametrize("values", [
    adapters(runtimeUpdating=True, maxLoras=2),
    {**CANARY_VALUES, **adapters()},
], ids=["stable", "canary"])
def test_lint_is_clean_with_adapters(values):
    from helm_python import lint

    result = lint(str(CHART), values, strict=True)
    assert result["errors"] == [], result


# --- what the pods would refuse, refused at render -----------------------------------------

REFUSED = [
    (adapters(modules=[*MODULES, {"name": "tenant-a", "path": "/adapters/tenant-a/v2"}]),
     'the name "tenant-a" is given twice'),
    ({**adapters(), "reference": {"adapterPath": "/models/reference-adapter"}},
     "reference.adapterPath makes the reference base \\+ one adapter"),
    (adapters(modules=[{"name": "tenant-a", "path": "/models/tenant-a"}]),
     "tenant-a: path /models/tenant-a is not under adapters.volume.mountPath /adapters"),
    (adapters(modules=[{"name": "t", "path": "/adapters/t", "referencePath": "/adapters-old/t"}]),
     "t: referencePath /adapters-old/t is not under adapters.volume.mountPath"),
    (adapters(modules=[{"name": "candidate", "path": "/adapters/c"}]), '"candidate" is candidate.servedModelName'),
    (adapters(maxLoras=4, maxCpuLoras=2), "adapters.maxCpuLoras \\(2\\) must be at least adapters.maxLoras \\(4\\)"),
    (adapters(maxCpuLoras=1), "2 adapters, but adapters.maxCpuLoras is 1"),
    (adapters(referenceMaxAdapters=1), "2 adapters, but adapters.referenceMaxAdapters is 1"),
    (adapters(volume={"claimName": "models", "mountPath": "/models"}),
     "adapters.volume.mountPath /models is where the models volume is mounted"),
]


@pytest.mark.parametrize("values, message", REFUSED, ids=[m.split(":")[0][:40] for _, m in REFUSED])
def test_what_the_pods_would_refuse_fails_the_render(values, message):
    from helm_python import HelmError

    with pytest.raises(HelmError, match=message):
        render(values)


def test_an_adapter_path_on_a_canary_without_its_reference_is_still_checked():
    """The shared reference is another release's: its adapterPath and max-adapters are not
    this one's to check, but the paths both pods read are."""
    canary = {**CANARY_VALUES, **adapters(), "reference": {**CANARY_VALUES["reference"], "adapterPath": "/models/x"}}
    assert render(canary, name="shadowserve-canary")
    from helm_python import HelmError

    with pytest.raises(HelmError, match="is not under adapters.volume.mountPath"):
        render({**canary, **adapters(modules=[{"name": "t", "path": "/elsewhere/t"}])}, name="shadowserve-canary")


BAD_ADAPTERS = [
    ({"modules": [{"name": "tenant a", "path": "/adapters/a"}]}, "/adapters/modules/0/name"),
    ({"modules": [{"name": "", "path": "/adapters/a"}]}, "/adapters/modules/0/name"),
    ({"modules": [{"name": "a=b", "path": "/adapters/a"}]}, "/adapters/modules/0/name"),
    ({"modules": [{"name": "a"}]}, "'/adapters/modules/0': missing property 'path'"),
    ({"modules": [{"name": "a", "path": "adapters/a"}]}, "/adapters/modules/0/path"),
    ({"modules": [{"name": "a", "path": "/adapters/a", "refPath": "/adapters/b"}]},
     "'/adapters/modules/0': additional properties 'refPath'"),
    ({"maxLoras": 0}, "/adapters/maxLoras"),
    ({"maxCpuLoras": "4"}, "/adapters/maxCpuLoras"),
    ({"referenceMaxAdapters": 0}, "/adapters/referenceMaxAdapters"),
    ({"runtimeUpdating": "yes"}, "/adapters/runtimeUpdating"),
    ({"volume": {"claimName": "adapters", "mountPath": "adapters"}}, "/adapters/volume/mountPath"),
    ({"lora": []}, "'/adapters': additional properties 'lora'"),
]


@pytest.mark.parametrize("values, where", BAD_ADAPTERS, ids=[f"{n}-{list(v)[0]}" for n, (v, _) in enumerate(BAD_ADAPTERS)])
def test_the_schema_rejects_bad_adapters(values, where):
    from helm_python import HelmValuesError

    with pytest.raises(HelmValuesError, match=re.escape(where)):
        render({"adapters": values})


# --- the docs' LoRA canary ------------------------------------------------------------------

DOCS = CHART.parents[1] / "docs" / "kubernetes.md"


def docs_values(name: str) -> dict:
    """The YAML block of docs/kubernetes.md that starts with `# NAME`."""
    (block,) = [b for b in re.findall(r"^```yaml\n(.*?)^```", DOCS.read_text(), re.S | re.M)
                if b.startswith(f"# {name}")]
    return yaml.safe_load(block)


def layered(*files: dict) -> dict:
    """Values files merged as `helm install -f A -f B` merges them (maps deep, the rest replaced)."""
    merged: dict = {}
    for values in files:
        for key, value in values.items():
            merged[key] = layered(merged[key], value) if isinstance(value, dict) and isinstance(
                merged.get(key), dict) else value
    return merged


def test_the_docs_lora_canary_renders_as_it_says():
    """"A LoRA canary end to end": the stable release mounts its adapters on both pods and
    opens its reference to run-time loads; the canary, on the stable release's reference,
    mounts its new version under its own name, and its gate reads that adapter alone."""
    stable = render(docs_values("stable-lora.yaml"))
    reference = container(stable, "reference").args
    assert "--allow-runtime-lora-updating=true" in reference
    assert "support=/adapters/support/v3" in flags(reference, "--lora-modules")
    assert "support=/adapters/support/v3" in flags(container(stable, "candidate").args, "--shadow-reference-lora-modules")
    assert "tenant-a=/adapters/tenant-a/v1" in flags(reference, "--lora-modules")
    canary = render(layered(CANARY_VALUES, docs_values("canary-lora.yaml")), name="shadowserve-canary")
    (only,) = by_kind(canary, "Deployment")
    args = only["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flags(args, "--lora-modules") == ["tenant-a-v2=/adapters/tenant-a/v2"]
    assert "--model=/models/llama-base" in args and "--shadow-labels=variant=canary" in args
    (analysis,) = by_kind(canary, "AnalysisTemplate")
    (metric,) = analysis["spec"]["metrics"]
    query = metric["provider"]["prometheus"]["query"]
    assert query == 'min(shadow_verdict_state{model="candidate",variant="canary",adapter="tenant-a-v2"}) or on () vector(0)'
    assert f"`{query}`" in DOCS.read_text()
