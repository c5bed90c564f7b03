"""Mounted adapters on a remote reference (server/reference_adapters.py, the service's side;
shadow/remote_adapters.py, the candidate's; adapters/lora_identity.py, the hash they
agree by): real `shadowserve reference` apps on a tiny random Llama with real peft
adapters, served by uvicorn on loopback, and the real RemoteScorer.

- the content hash: the same adapter anywhere (another directory, another recorded base
  path) hashes the same; other weights, another scale or another dtype do not;
- the service: adapters mounted at start are listed with their hashes and applied to
  the score requests that name them (by name and hash), as the in-process scorer applies
  them; other weights under a name are a 409, an adapter it does not hold a 404, unless
  run-time loads are on: then the request's path loads it (a restarted replica);
  loads are idempotent for the same content, unloads refuse what was mounted at start;
- the candidate: an adapter the reference holds with the same hash is shadowed; other
  weights, or one it neither holds nor may load, are refused naming both hashes or how
  to mount it; one it may load is loaded, and unloaded with the candidate's unload."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from prometheus_client import CollectorRegistry

from adapters.lora_identity import adapter_sha256
from server.reference_adapters import ReferenceAdapters
from server.reference_app import create_reference_app
from shadow.local_scorer import LocalScorer
from shadow.remote_scorer import RemoteScorer
from shadow.scoring import AdapterUnavailableError, ScoreItem, ShadowReferenceError
from tests.candidates import lora_adapter, with_alpha
from tests.servers import free_port


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("reference-adapters")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    a = lora_adapter(root / "base", root / "a", scale=1.0, seed=1)
    out = {"base": root / "base", "a": a, "b": lora_adapter(root / "base", root / "b", scale=1.0, seed=2),
           "a_alpha": with_alpha(a, root / "a-alpha", 32)}
    # The same adapter copied elsewhere, its recorded base path another host's.
    shutil.copytree(a, root / "a-copy")
    config_path = root / "a-copy" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": "/mnt/x"}))
    out["a_copy"] = root / "a-copy"
    return out


class Service:
    """A reference app on loopback, in a thread of this process."""

    def __init__(self, scorer: LocalScorer, adapters: ReferenceAdapters):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_reference_app(scorer, [], CollectorRegistry(), adapters=adapters)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def service(models, runtime: bool, mounts: dict[str, str]) -> Service:
    scorer = LocalScorer.load(models["base"], device="cpu")
    adapters = ReferenceAdapters(scorer, models["base"], runtime_updating=runtime, capacity=3)
    adapters.mount_at_start([(name, models[key]) for name, key in mounts.items()])
    return Service(scorer, adapters)


@pytest.fixture(scope="module")
def fixed(models):
    """Adapters a and b mounted at start; no run-time loads."""
    running = service(models, runtime=False, mounts={"a": "a", "b": "b"})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def loading(models):
    """a mounted at start; run-time loads allowed."""
    running = service(models, runtime=True, mounts={"a": "a"})
    yield running
    running.stop()


def items(tokenizer) -> list[ScoreItem]:
    prompt = tokenizer.encode("The capital of France is")
    output = tokenizer.encode(" Paris, a city on the Seine.")
    return [ScoreItem(prompt, output, [[t, 42] for t in output])]


def run(remote: RemoteScorer, *calls) -> list:
    """Score calls (items, adapter) on one event loop (the client's connections belong to it)."""

    async def all_of_them():
        try:
            return [await remote.score(batch, top_m=5, adapter=adapter) for batch, adapter in calls]
        finally:
            await remote.close()

    return asyncio.run(all_of_them())


def test_the_hash_is_the_content_not_the_place(models):
    a = adapter_sha256(models["a"])
    assert a == adapter_sha256(models["a_copy"])  # copied, and trained from "another" base path
    assert len({a, adapter_sha256(models["b"]), adapter_sha256(models["a_alpha"])}) == 3
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["base"]), models["a"])
    model.to(torch.bfloat16).save_pretrained(models["a"].parent / "a-bf16")
    assert adapter_sha256(models["a"].parent / "a-bf16") != a  # the same adapter in bf16 rounds differently


def test_the_service_lists_its_adapters_and_scores_each_as_the_local_scorer(models, fixed, tokenizer):
    info = httpx.get(f"{fixed.url}/v1/shadow/info").json()
    assert [(x["name"], x["sha256"], x["pinned"]) for x in info["adapters"]] == \
        [("a", adapter_sha256(models["a"]), True), ("b", adapter_sha256(models["b"]), True)]
    assert info["runtime_lora_updating"] is False and info["max_adapters"] == 3
    assert httpx.post(f"{fixed.url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "/x"}).status_code == 404

    local = LocalScorer.load(models["base"], device="cpu")
    local.add_adapter("a", models["a"])
    remote = RemoteScorer.connect(fixed.url, None, timeout=60)
    remote.add_adapter("a", models["a_copy"])  # held under that name with the same content
    batch = items(tokenizer)
    here = local.score_sync(batch, top_m=5, adapter="a")[0].reference
    there, base = (scored[0].reference for scored in run(remote, (batch, "a"), (batch, None)))
    for p, q in zip(here, there, strict=True):
        assert p.top_ids == q.top_ids
        assert list(p.logprobs.values()) == pytest.approx(list(q.logprobs.values()), abs=1e-6)
    assert max(abs(q.top_logprobs[0] - r.top_logprobs[0]) for q, r in zip(there, base)) > 1e-3  # a applied


def test_a_candidate_refuses_other_weights_or_an_adapter_the_reference_cannot_hold(models, fixed):
    remote = RemoteScorer.connect(fixed.url, None, timeout=60)
    with pytest.raises(AdapterUnavailableError) as other:
        remote.add_adapter("a", models["a_alpha"])
    message = str(other.value)
    assert "holds other weights under that name" in message
    assert adapter_sha256(models["a"])[:12] in message and adapter_sha256(models["a_alpha"])[:12] in message
    with pytest.raises(AdapterUnavailableError, match="does not allow run-time loads: mount it there"):
        remote.add_adapter("c", models["a"])


def test_the_service_refuses_a_score_with_other_weights_or_an_adapter_it_lacks(models, fixed, tokenizer):
    remote = RemoteScorer.connect(fixed.url, None, timeout=60)
    remote.adapters.add("a", models["a_alpha"], reachable=False)  # not checked at mount: the score request is
    with pytest.raises(AdapterUnavailableError, match="holds other weights under the name a"):
        run(remote, (items(tokenizer), "a"))
    remote = RemoteScorer.connect(fixed.url, None, timeout=60)
    remote.adapters.add("c", models["a"], reachable=False)
    with pytest.raises(AdapterUnavailableError, match="does not allow run-time loads"):
        run(remote, (items(tokenizer), "c"))


def test_a_reference_that_may_load_takes_what_the_candidate_serves_and_gives_it_back(models, loading, tokenizer):
    remote = RemoteScorer.connect(loading.url, None, timeout=60)
    remote.add_adapter("b", models["b"])  # loaded there by this candidate
    held = {x["name"]: x for x in httpx.get(f"{loading.url}/v1/shadow/info").json()["adapters"]}
    assert held["b"]["sha256"] == adapter_sha256(models["b"]) and not held["b"]["pinned"]
    run(remote, (items(tokenizer), "b"))
    again = httpx.post(f"{loading.url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(models["b"])})
    assert again.status_code == 200  # another candidate replica loading the same content: a no-op
    clash = httpx.post(f"{loading.url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(models["a"])})
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "adapter_conflict"
    pinned = httpx.post(f"{loading.url}/v1/unload_lora_adapter", json={"lora_name": "a"})
    assert pinned.status_code == 400 and "mounted at start" in pinned.json()["error"]["message"]
    remote.remove_adapter("b")
    assert [x["name"] for x in httpx.get(f"{loading.url}/v1/shadow/info").json()["adapters"]] == ["a"]


def test_a_replica_that_lost_an_adapter_loads_it_from_the_score_request(models, loading, tokenizer):
    """A restarted (or new) reference replica holds only its --lora-modules; the candidate's
    score request names the adapter with its hash and path, and it is loaded then."""
    remote = RemoteScorer.connect(loading.url, None, timeout=60)
    remote.adapters.add("b2", models["b"], reachable=False)  # as if loaded on a replica that is gone now
    scored = run(remote, (items(tokenizer), "b2"))[0]
    assert len(scored[0].reference) == len(items(tokenizer)[0].output_ids)
    assert "b2" in [x["name"] for x in httpx.get(f"{loading.url}/v1/shadow/info").json()["adapters"]]
    # ... but never other content than the request's hash says.
    remote.adapters.add("c2", models["a_alpha"], reachable=False)
    ref = remote.adapters.ref("c2")
    body = {"items": [{"prompt_ids": [1, 2], "output_ids": [3], "candidate_ids": [[3]]}],
            "adapter": {"name": "c3", "sha256": ref.sha256, "path": str(models["a"])}}
    reply = httpx.post(f"{loading.url}/v1/shadow/score", json=body)
    assert reply.status_code == 409 and "c3" not in [x["name"] for x in httpx.get(f"{loading.url}/v1/shadow/info").json()["adapters"]]
    assert httpx.post(f"{loading.url}/v1/unload_lora_adapter", json={"lora_name": "b2"}).status_code == 200


def test_the_service_holds_at_most_max_adapters(models, loading):
    for name in ("x1", "x2"):
        httpx.post(f"{loading.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(models["b"])})
    full = httpx.post(f"{loading.url}/v1/load_lora_adapter", json={"lora_name": "x3", "lora_path": str(models["b"])})
    assert full.status_code == 400 and "--max-adapters 3" in full.json()["error"]["message"]
    for name in ("x1", "x2"):
        assert httpx.post(f"{loading.url}/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_an_adapter_for_another_base_is_refused_with_the_reason(models, loading, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "foreign")
    reply = httpx.post(f"{loading.url}/v1/load_lora_adapter", json={"lora_name": "f", "lora_path": str(tmp_path / "foreign")})
    assert reply.status_code == 400 and "trained for another base" in reply.json()["error"]["message"]
    missing = httpx.post(f"{loading.url}/v1/load_lora_adapter", json={"lora_name": "m", "lora_path": str(tmp_path / "no")})
    assert missing.status_code == 404


def test_reference_settings_refuse_what_would_not_mount(models):
    from pydantic import ValidationError

    from server.reference_app import ReferenceSettings

    ok = ReferenceSettings(model=models["base"], lora_modules=[f"a={models['a']}"])
    assert ok.lora_mounts() == [("a", models["a"])]
    for kwargs, words in (
        ({"lora_modules": [f"a={models['a']}", f"a={models['b']}"]}, "given twice"),
        ({"lora_modules": [f"a={models['a']}"], "adapter": models["b"]}, "give one or the other"),
        ({"lora_modules": [f"a={models['a']}", f"b={models['b']}"], "max_adapters": 1}, "--max-adapters is 1"),
    ):
        with pytest.raises(ValidationError, match=words):
            ReferenceSettings(model=models["base"], **kwargs)


def test_the_candidate_fails_clearly_on_an_adapter_directory_it_cannot_read(models, fixed):
    remote = RemoteScorer.connect(fixed.url, None, timeout=60)
    with pytest.raises(ShadowReferenceError, match="no LoRA adapter there"):
        remote.add_adapter("a", models["a"].parent / "nope")


# --- the candidate's registry (server/serving/adapters.py) on a remote reference ------------


class Engine:
    """Stands in for vLLM's add_lora: records what it mounted, or refuses."""

    def __init__(self, refuse: bool = False):
        self.refuse, self.mounted = refuse, []

    async def add_adapter(self, adapter) -> None:
        if self.refuse:
            from server.engines import EngineInputError

            raise EngineInputError("vLLM refused it")
        self.mounted.append(adapter.name)


def registry(models, reference: Service, engine: Engine):
    from server.serving.adapters import AdapterRegistry
    from shadow.metrics import ShadowMetrics
    from shadow.path import ShadowPath
    from shadow.settings import ShadowSettings

    scorer = RemoteScorer.connect(reference.url, None, timeout=60)
    settings = ShadowSettings(shadow_rate=1.0, shadow_reference_url=reference.url)
    shadow = ShadowPath(settings, scorer, ShadowMetrics(CollectorRegistry(), "base", scorer.name))
    return AdapterRegistry(engine, "base", models["base"], rank_limit=16, capacity=4, shadow=shadow), shadow


def test_at_start_an_adapter_the_reference_lacks_stops_the_start_at_run_time_it_is_served_unshadowed(models, fixed):
    engine = Engine()
    adapters, shadow = registry(models, fixed, engine)

    async def scenario():
        with pytest.raises(AdapterUnavailableError, match="not on the remote reference"):
            await adapters.load("c", models["a"], at_start=True)
        assert engine.mounted == [] and shadow.lane("c") is None  # nothing mounted anywhere
        await adapters.load("c", models["a"])  # at run time: served, not shadowed
        await adapters.load("a", models["a_copy"])  # held there with this content: shadowed
        await shadow.scorer.close()

    asyncio.run(scenario())
    assert engine.mounted == ["c", "a"]
    assert shadow.lane("c").unshadowed and not shadow.admit(adapter="c") and shadow.admit(adapter="a")
    reasons = shadow.report(adapter="c").verdict.reasons
    assert reasons[0].startswith("not shadowed") and "--allow-runtime-lora-updating" in reasons[0]


def test_a_run_time_load_the_engine_refuses_is_taken_back_from_the_reference(models, loading):
    adapters, shadow = registry(models, loading, Engine(refuse=True))
    from server.errors import InvalidRequestError

    async def scenario():
        with pytest.raises(InvalidRequestError, match="vLLM refused it"):
            await adapters.load("d", models["b"])
        await shadow.scorer.close()

    asyncio.run(scenario())
    assert "d" not in [x["name"] for x in httpx.get(f"{loading.url}/v1/shadow/info").json()["adapters"]]
    assert shadow.lane("d") is None


def test_a_load_a_score_request_asks_for_that_fails_unshadows_the_adapter(models, loading, tokenizer):
    remote = RemoteScorer.connect(loading.url, None, timeout=60)
    remote.adapters.add("gone", models["b"], reachable=False)
    remote.adapters._refs["gone"] = remote.adapters.ref("gone").model_copy(update={"path": str(models["b"]) + "-moved"})
    with pytest.raises(AdapterUnavailableError, match="could not be loaded from .*no LoRA adapter there"):
        run(remote, (items(tokenizer), "gone"))


def test_an_answer_from_another_reference_is_never_scored(models, fixed, tokenizer):
    from shadow.scoring import ReferenceInfo, ReferenceUnavailableError

    info = httpx.get(f"{fixed.url}/v1/shadow/info").json()
    remote = RemoteScorer(fixed.url, None, 60, ReferenceInfo(**{**info, "name": "the-reference-it-was"}))
    with pytest.raises(ReferenceUnavailableError, match="answered as base, not the-reference-it-was"):
        run(remote, (items(tokenizer), None))
    assert not remote.reachable  # the watch checks it again before anything is scored
