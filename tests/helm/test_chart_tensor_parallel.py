"""A reference larger than one GPU: `shadowserve reference --tensor-parallel-size N`.

On one node (reference.nodes 1) one pod requests the N GPUs and the service launches its N
ranks itself. Across nodes (reference.nodes > 1) a LeaderWorkerSet of `nodes` pods per
replica, each N / nodes GPUs, every pod under torchrun (static rendezvous on the leader,
its node rank the LWS worker index); only global rank 0, on the leader, serves HTTP, so
the Service, the probes and the autoscaler's metrics are the leader's. A dead rank ends
its node's torchrun non-zero and the LWS recreates the whole group."""

from __future__ import annotations

import json
import re

import pytest
from kubernetes.client import ApiClient

from tests.helm.chart import CANARY_VALUES, CHART, as_k8s, by_kind, deployment, render
from tests.helm.crd_models import ScaledObject, leaderworkerset_errors, lws_crd

# The names LWS gives its pods' label and env (api/leaderworkerset/v1/leaderworkerset_types.go:
# WorkerIndexLabelKey, LwsWorkerIndex, LwsLeaderAddress, LwsGroupSize).
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
LWS_ENV = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")

SINGLE = {"reference": {"tensorParallelSize": 4}}
MULTI = {"reference": {"tensorParallelSize": 8, "nodes": 2}}


def reference_args(values: dict | None = None) -> list[str]:
    return deployment(render(values), "reference")["spec"]["template"]["spec"]["containers"][0]["args"]


def the_lws(docs: list[dict]) -> dict:
    (lws,) = by_kind(docs, "LeaderWorkerSet")
    return lws


def pod_template(lws: dict, role: str) -> dict:
    return lws["spec"]["leaderWorkerTemplate"][f"{role}Template"]


def container(template: dict) -> dict:
    (only,) = template["spec"]["containers"]
    return only


def service(docs: list[dict]) -> dict:
    return next(d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-reference"))


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """What the kubelet runs: $(VAR) replaced by the container's env (LWS injects its own)."""
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


# --- one node ---------------------------------------------------------------------------------


def test_one_replica_of_one_gpu_is_what_it_was():
    docs = render()
    reference = as_k8s(deployment(docs, "reference"))
    c = reference.spec.template.spec.containers[0]
    assert c.args[0] == "reference" and c.command is None
    assert not any(a.startswith("--tensor-parallel-size") for a in c.args)
    assert c.resources.limits["nvidia.com/gpu"] == "1"
    assert not [v for v in reference.spec.template.spec.volumes if v.name == "shm"]
    assert by_kind(docs, "LeaderWorkerSet") == []
    assert WORKER_INDEX_LABEL not in service(docs)["spec"]["selector"]


def test_one_node_is_one_deployment_with_n_gpus_that_launches_its_ranks():
    docs = render(SINGLE)
    assert by_kind(docs, "LeaderWorkerSet") == []
    reference = as_k8s(deployment(docs, "reference"))
    spec = reference.spec.template.spec
    (c,) = spec.containers
    # `shadowserve reference` itself: it re-executes through torchrun's standalone rendezvous
    assert c.command is None and c.args[0] == "reference"
    assert "--tensor-parallel-size=4" in c.args
    assert c.resources.limits["nvidia.com/gpu"] == "4"
    assert c.resources.limits["memory"] == "32Gi" and c.resources.requests == {"cpu": "2", "memory": "16Gi"}
    # NCCL between the ranks: /dev/shm in memory, not the container's 64 MiB
    (shm,) = [v for v in spec.volumes if v.name == "shm"]
    assert (shm.empty_dir.medium, shm.empty_dir.size_limit) == ("Memory", "1Gi")
    assert any(m.name == "shm" and m.mount_path == "/dev/shm" for m in c.volume_mounts)
    assert c.readiness_probe.http_get.path == "/health" and c.startup_probe.tcp_socket.port == "http"
    # one pod: the Service and the autoscaler are the Deployment's, as with one GPU
    assert WORKER_INDEX_LABEL not in service(docs)["spec"]["selector"]
    scaled = ScaledObject.model_validate(by_kind(docs, "ScaledObject")[0])
    assert (scaled.spec.scaleTargetRef.kind, scaled.spec.scaleTargetRef.name) == ("Deployment", "shadowserve-stable-reference")


def test_the_gpu_resource_is_the_one_the_values_name():
    """The GPU limit (and request, where one is given) becomes the pod's share; the key is
    the one `reference.resources.limits` names ending in /gpu, nvidia.com/gpu if none."""
    # (null removes the default's nvidia.com/gpu, as Helm merges values)
    amd = {"limits": {"amd.com/gpu": "1", "nvidia.com/gpu": None, "memory": "64Gi"},
           "requests": {"amd.com/gpu": "1", "cpu": "4"}}
    c = container(deployment(render({"reference": {"tensorParallelSize": 2, "resources": amd}}), "reference")[
        "spec"]["template"])
    assert c["resources"] == {"limits": {"amd.com/gpu": "2", "memory": "64Gi"},
                              "requests": {"amd.com/gpu": "2", "cpu": "4", "memory": "16Gi"}}
    bare = container(deployment(render({"reference": {"tensorParallelSize": 2, "resources": {
        "limits": {"nvidia.com/gpu": None}}}}), "reference")["spec"]["template"])
    assert bare["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "32Gi"}
    c = container(the_lws(render({"reference": {**MULTI["reference"], "resources": amd}}))["spec"][
        "leaderWorkerTemplate"]["workerTemplate"])
    assert c["resources"]["limits"]["amd.com/gpu"] == "4" and c["resources"]["requests"]["amd.com/gpu"] == "4"
    # the values are not changed underneath: a one-GPU render after them still asks for 1
    assert container(deployment(render(), "reference")["spec"]["template"])["resources"]["limits"][
        "nvidia.com/gpu"] == "1"


# --- several nodes: a LeaderWorkerSet ------------------------------------------------------------


@pytest.fixture(scope="module")
def multi():
    return render(MULTI)


def test_several_nodes_render_a_leaderworkerset_valid_against_its_crd(multi):
    assert not [d for d in by_kind(multi, "Deployment") if d["metadata"]["name"].endswith("-reference")]
    lws = the_lws(multi)
    assert leaderworkerset_errors(lws) == []
    assert lws["metadata"]["name"] == "shadowserve-stable-reference-lws"
    spec = lws["spec"]
    assert "replicas" not in spec  # the autoscaler owns it (the CRD's default: 1)
    assert spec["startupPolicy"] == "LeaderCreated"  # the leader is Ready only once the workers joined
    template = spec["leaderWorkerTemplate"]
    assert template["size"] == 2 and template["restartPolicy"] == "RecreateGroupOnPodRestart"
    for role in ("leader", "worker"):  # and each pod template is a core PodTemplateSpec
        typed = ApiClient().deserialize(json.dumps(pod_template(lws, role)), "V1PodTemplateSpec", "application/json")
        assert typed.spec.containers[0].resources.limits["nvidia.com/gpu"] == "4", role
        assert typed.metadata.labels["app.kubernetes.io/component"] == "reference", role
    fixed = the_lws(render({"reference": {**MULTI["reference"], "replicas": 3, "autoscaling": {"enabled": False}}}))
    assert fixed["spec"]["replicas"] == 3 and leaderworkerset_errors(fixed) == []


def test_the_lws_is_not_named_as_the_service(multi):
    """The LWS controller creates a headless Service of the LWS's own name (the pods'
    subdomain, where LWS_LEADER_ADDRESS resolves): it must not be the Service the
    candidates call, which the chart owns."""
    assert the_lws(multi)["metadata"]["name"] != service(multi)["metadata"]["name"] == "shadowserve-stable-reference"
    candidate = deployment(multi, "candidate")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--shadow-reference-url=http://shadowserve-stable-reference:8001" in candidate


def test_the_service_selects_the_leaders_only(multi):
    lws = the_lws(multi)
    selector = service(multi)["spec"]["selector"]
    assert selector[WORKER_INDEX_LABEL] == "0"
    # The pods' labels as LWS completes them: worker index 0 on the leader, 1.. on the workers.
    leader = {**pod_template(lws, "leader")["metadata"]["labels"], WORKER_INDEX_LABEL: "0"}
    worker = {**pod_template(lws, "worker")["metadata"]["labels"], WORKER_INDEX_LABEL: "1"}
    assert selector.items() <= leader.items()
    assert not selector.items() <= worker.items()
    # The leader serves and is probed; a worker has no HTTP, so no port and no probe.
    lead, work = container(pod_template(lws, "leader")), container(pod_template(lws, "worker"))
    assert lead["ports"] == [{"name": "http", "containerPort": 8001}]
    assert lead["readinessProbe"]["httpGet"]["path"] == "/health" and "startupProbe" in lead
    assert not {"ports", "startupProbe", "readinessProbe", "livenessProbe"} & work.keys()


def test_leader_and_workers_share_the_reference_pod(multi):
    """One pod spec (templates/_reference.tpl) for the Deployment, the leader and the
    workers: the same image, flags, env, mounts, volumes and resources."""
    lws = the_lws(multi)
    lead, work = pod_template(lws, "leader"), pod_template(lws, "worker")
    serving = ("ports", "startupProbe", "readinessProbe")
    assert {k: v for k, v in container(lead).items() if k not in serving} == container(work)
    assert lead["spec"]["volumes"] == work["spec"]["volumes"]
    assert lead["metadata"] == work["metadata"]
    single = deployment(render(SINGLE), "reference")["spec"]["template"]
    one = container(single)
    assert one["env"] == container(lead)["env"] and one["volumeMounts"] == container(lead)["volumeMounts"]
    assert single["spec"]["volumes"] == lead["spec"]["volumes"]
    # the same flags, but for the size: torchrun runs `shadowserve` + the single pod's args
    args = container(lead)["args"]
    assert args[args.index("shadowserve") + 1:] == [a.replace("=4", "=8") if a.startswith("--tensor") else a
                                                    for a in one["args"]]


@pytest.mark.parametrize("role, index", [("leader", "0"), ("worker", "1")])
def test_every_node_runs_torchrun_with_its_node_rank_and_the_leaders_address(multi, role, index, monkeypatch):
    """Parsed by torchrun's own parser, after the kubelet's $(VAR) expansion with what LWS
    injects: a static rendezvous on the leader, nodes x GPUs per node ranks, no in-place
    restart (a dead rank ends the node's torchrun: the group is recreated), then
    `shadowserve reference` with the same flags on every rank."""
    from torch.distributed.run import config_from_args, get_args_parser

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args would set it for the whole test process
    c = container(pod_template(the_lws(multi), role))
    assert c["command"] == ["torchrun"]
    used = set(re.findall(r"\$\(([A-Za-z_0-9]+)\)", " ".join(c["args"])))
    assert used == {"LWS_WORKER_INDEX", "LWS_LEADER_ADDRESS"} and used <= set(LWS_ENV)
    assert not used & {e["name"] for e in c["env"]}  # LWS's to inject, not overridden
    leader = "shadowserve-stable-reference-lws-0.shadowserve-stable-reference-lws.llm"
    args = expand(c["args"], {"LWS_WORKER_INDEX": index, "LWS_LEADER_ADDRESS": leader, "LWS_GROUP_SIZE": "2"})
    config, cmd, cmd_args = config_from_args(get_args_parser().parse_args(args))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 4)
    assert config.rdzv_backend == "static" and config.rdzv_endpoint == f"{leader}:29500"
    assert config.rdzv_configs["rank"] == int(index) and config.max_restarts == 0
    assert cmd == "shadowserve" and cmd_args[0] == "reference"
    assert "--tensor-parallel-size=8" in cmd_args  # = nnodes x nproc-per-node


def test_the_master_port_is_a_value():
    lws = the_lws(render({"reference": {**MULTI["reference"], "masterPort": 29600}}))
    assert "--master-port=29600" in container(pod_template(lws, "worker"))["args"]


def test_the_ranks_reach_each_other_through_the_network_policy(multi):
    """torchrun's rendezvous (masterPort, on the leader) and NCCL (ports it picks) run
    between the reference's own pods: a rule admits them on every port; the reference
    port stays the candidates' (and Prometheus')."""
    (policy,) = by_kind(multi, "NetworkPolicy")
    typed = as_k8s(policy)
    clients, ranks = typed.spec.ingress
    assert [p.port for p in clients.ports] == [8001]
    (peers,) = ranks._from
    assert ranks.ports is None  # every port
    assert peers.pod_selector.match_labels == typed.spec.pod_selector.match_labels
    lws = the_lws(multi)
    for role in ("leader", "worker"):
        assert peers.pod_selector.match_labels.items() <= pod_template(lws, role)["metadata"]["labels"].items()
    (one,) = by_kind(render(SINGLE), "NetworkPolicy")
    assert len(one["spec"]["ingress"]) == 1  # one pod: its ranks talk over loopback


def test_the_autoscalers_scale_the_leaderworkerset(multi):
    """A LeaderWorkerSet has the scale subresource (one replica: one group; its selector the
    leaders'), which KEDA and the HPA drive as they drive a Deployment."""
    scale = lws_crd()["subresources"]["scale"]
    assert (scale["specReplicasPath"], scale["labelSelectorPath"]) == (".spec.replicas", ".status.hpaPodSelector")
    ref = ScaledObject.model_validate(by_kind(multi, "ScaledObject")[0]).spec.scaleTargetRef
    assert (ref.apiVersion, ref.kind, ref.name) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet",
                                                    "shadowserve-stable-reference-lws")
    hpa = as_k8s(by_kind(render({"reference": {**MULTI["reference"], "autoscaling": {"mode": "hpa"}}}),
                         "HorizontalPodAutoscaler")[0])
    target = hpa.spec.scale_target_ref
    assert (target.api_version, target.kind, target.name) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet",
                                                              "shadowserve-stable-reference-lws")


def test_the_crd_schema_can_fail(multi):
    """The vendored schema refuses what the API server would: an unknown field, a value
    outside an enum, a wrong type, a missing required field."""
    assert lws_crd()["source"]["repository"] == "https://github.com/kubernetes-sigs/lws"
    lws = the_lws(multi)
    broken = json.loads(json.dumps(lws))
    broken["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "RecreateGroup"
    broken["spec"]["startupPolicy"] = "LeaderScheduled"
    broken["spec"]["leaderWorkerTemplate"]["size"] = "2"
    del broken["spec"]["leaderWorkerTemplate"]["workerTemplate"]
    broken["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"] = "four"
    errors = "\n".join(leaderworkerset_errors(broken))
    for needle in ("'RecreateGroup' is not one of", "'LeaderScheduled' is not one of", "'2' is not of type 'integer'",
                   "'workerTemplate' is a required property", "$.spec.leaderWorkerTemplate.leaderTemplate.spec."
                   "containers[0].resources.limits['nvidia.com/gpu']"):
        assert needle in errors, (needle, errors)
    typo = json.loads(json.dumps(lws))
    container(typo["spec"]["leaderWorkerTemplate"]["workerTemplate"])["readinesProbe"] = {}
    assert any("'readinesProbe' was unexpected" in e for e in leaderworkerset_errors(typo))
    assert leaderworkerset_errors({**lws, "apiVersion": "leaderworkerset.x-k8s.io/v1beta1"})


# --- the rendered flags, read by the real command line ---------------------------------------------


@pytest.mark.parametrize("values, size", [({}, 1), (SINGLE, 4), (MULTI, 8)], ids=["one-gpu", "one-node", "nodes"])
def test_the_rendered_reference_args_parse_with_the_real_command_line(values, size):
    from server.cli import cli_source
    from server.reference_app import ReferenceSettings

    if "tensor_parallel_size" not in ReferenceSettings.model_fields:
        pytest.xfail("`shadowserve reference --tensor-parallel-size` is not in the CLI yet")
    docs = render(values)
    if by_kind(docs, "LeaderWorkerSet"):
        args = container(pod_template(the_lws(docs), "worker"))["args"]
        args = args[args.index("shadowserve") + 1:]  # what torchrun runs on every rank
    else:
        args = container(deployment(docs, "reference")["spec"]["template"])["args"]
    parsed = vars(cli_source(cli_exit_on_error=False).root_parser.parse_args(args))
    given = {key.removeprefix("reference."): value for key, value in parsed.items()
             if key.startswith("reference.") and value is not None}
    assert int(given.get("tensor_parallel_size", 1)) == size
    # and the settings hold (the token is the Secret's, in the env): nothing the reference refuses
    settings = ReferenceSettings(**given, tokens=["from-the-secret"])
    assert settings.tensor_parallel_size == size and settings.host == "0.0.0.0" and settings.port == 8001


# --- refused at render, in the values' own terms ------------------------------------------------------

MODULES = [{"name": "tenant-a", "path": "/adapters/tenant-a/v1"}]

REFUSED = [
    ({"reference": {"tensorParallelSize": 4, "nodes": 3}}, "reference.tensorParallelSize 4 does not divide over "
                                                          "reference.nodes 3"),
    ({"reference": {"nodes": 2}}, "reference.tensorParallelSize 1 does not divide over reference.nodes 2"),
    ({"reference": {"tensorParallelSize": 2}, "adapters": {"modules": MODULES}},
     "reference.tensorParallelSize 2 with adapters.modules: a tensor-parallel reference mounts no LoRA adapter"),
    ({"reference": {"tensorParallelSize": 2}, "adapters": {"runtimeUpdating": True}},
     "reference.tensorParallelSize 2 with adapters.runtimeUpdating:"),
    ({**MULTI, "reference": {**MULTI["reference"], "adapterPath": "/models/reference-adapter"}},
     "reference.tensorParallelSize 8 with reference.adapterPath:"),
    ({"reference": {"tensorParallelSize": 2}, "adapters": {"modules": MODULES, "runtimeUpdating": True}},
     "with adapters.modules, adapters.runtimeUpdating:"),
    ({"reference": {**MULTI["reference"], "masterPort": 8001}}, "reference.masterPort 8001 is reference.port"),
    ({"reference": {"tensorParallelSize": 2, "resources": {"limits": {"amd.com/gpu": "1"}}}},  # and the default's
     "reference.resources.limits names amd.com/gpu, nvidia.com/gpu"),
]


@pytest.mark.parametrize("values, message", REFUSED, ids=[m.split(":")[0][:48] for _, m in REFUSED])
def test_what_the_reference_cannot_run_fails_the_render(values, message):
    from helm_python import HelmError

    with pytest.raises(HelmError, match=re.escape(message)):
        render(values)


def test_a_reference_of_one_rank_keeps_its_adapters():
    args = reference_args({"adapters": {"modules": MODULES, "runtimeUpdating": True}})
    assert "--lora-modules=tenant-a=/adapters/tenant-a/v1" in args and "--allow-runtime-lora-updating=true" in args


def test_a_canary_without_its_reference_does_not_check_one():
    """The shared reference is the stable release's: its size is not this release's to check."""
    canary = {**CANARY_VALUES, "reference": {**CANARY_VALUES["reference"], "tensorParallelSize": 3, "nodes": 2},
              "adapters": {"modules": MODULES}}
    docs = render(canary, name="shadowserve-canary")
    assert not by_kind(docs, "LeaderWorkerSet") and len(by_kind(docs, "Deployment")) == 1


BAD_VALUES = [
    ({"tensorParallelSize": 0}, "/reference/tensorParallelSize"),
    ({"tensorParallelSize": "4"}, "/reference/tensorParallelSize"),
    ({"nodes": 0}, "/reference/nodes"),
    ({"masterPort": 70000}, "/reference/masterPort"),
    ({"shmSize": "lots"}, "/reference/shmSize"),
    ({"tensorParalelSize": 4}, "'/reference': additional properties 'tensorParalelSize'"),
]


@pytest.mark.parametrize("values, where", BAD_VALUES, ids=[w.split("'")[-2] if "'" in w else w for _, w in BAD_VALUES])
def test_the_schema_rejects_bad_sizes(values, where):
    from helm_python import HelmValuesError

    with pytest.raises(HelmValuesError, match=re.escape(where)):
        render({"reference": values})


@pytest.mark.parametrize("values", [SINGLE, MULTI, {"reference": {**MULTI["reference"], "autoscaling": {"mode": "hpa"}}}],
                         ids=["one-node", "nodes", "nodes-hpa"])
def test_lint_is_clean_with_a_tensor_parallel_reference(values):
    from helm_python import lint

    result = lint(str(CHART), values, strict=True)
    assert result["errors"] == [], result
