"""Mounted LoRA adapters through the real vLLM engine on SmolLM2, adapters made here with
peft, read with the official openai client, /v1/models, /metrics and the verdict.

- A remote reference (`shadowserve reference`, as the chart deploys it) holds one fp32
  base and the adapters the candidates mount: `a` from its own --lora-modules, the others
  loaded on it by the candidates (run-time loads allowed), each matched by content hash.
  Four adapters cost it their own weights, not a base each.
- fp32 server on that reference, two adapters mounted plus the base: each answers as
  transformers + peft answers greedily in fp32 (an independent computation), differently
  from the base; the shadow finds each adapter identical to its reference (base +
  adapter unmerged in fp32); adapters are loaded and unloaded at run time, on the
  reference too, bad ones refused with the reason while the server keeps serving.
- bf16 server on that reference: an adapter mounted as trained passes the verdict at its
  noise floor; the same adapter with its scale edited (lora_alpha doubled), judged
  against the adapter as trained (the reference's own copy), fails; each verdict and
  series is its own, the base untouched.
- fp32 server with the in-process reference and without shadowserve's vLLM plugin
  (server/vllm_plugin.py): vLLM's CPU LoRA ops give base requests batched beside adapter
  requests an adapter's update, and the shadow's base lane shows it while the adapters'
  stay exact.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from adapters.lora_identity import adapter_sha256
from server.verify.inputs import BUILTIN_PROMPTS
from tests.candidates import lora_adapter, with_alpha
from tests.conftest import API_KEY, MODEL_NAME, REFERENCE_TOKEN
from tests.servers import RunningServer, free_port, launch, start_server

pytestmark = pytest.mark.integration

VLLM = ["--enforce-eager", "true", "--max-model-len", "1024", "--kv-cache-gib", "1"]
GREEDY_PROMPTS = ("Who are you?", "Describe the city of Paris.")
GREEDY_TOKENS = 16


@pytest.fixture(scope="module")
def lora(demo_model, tmp_path_factory) -> dict[str, Path]:
    """Adapters on the demo model: a and b (different seeds), a with its alpha doubled, a
    rank-32 one, and one trained on another base (a tiny Llama: other shapes)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    a = lora_adapter(demo_model, root / "a", seed=1234)
    out = {"a": a, "b": lora_adapter(demo_model, root / "b", seed=4321), "wrong_alpha": with_alpha(a, root / "wrong", 32),
           "rank32": lora_adapter(demo_model, root / "rank32", seed=7, rank=32)}
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    get_peft_model(tiny, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(root / "foreign")
    out["foreign"] = root / "foreign"
    return out


@pytest.fixture(scope="module")
def lora_reference(demo_model, lora, tmp_path_factory) -> RunningServer:
    """The fp32 reference as its own service: adapter `a` mounted at start, run-time loads on."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "reference", "--model", str(demo_model), "--port", str(port),
           "--tokens", REFERENCE_TOKEN, "--noise-dtype", "bfloat16", "--lora-modules", f"a={lora['a']}",
           "--allow-runtime-lora-updating", "true"]
    server = launch(cmd, port, tmp_path_factory.mktemp("lora-reference") / "reference.log", api_key=REFERENCE_TOKEN)
    yield server
    server.stop()


def held(reference: RunningServer) -> dict[str, str]:
    """The adapters the reference holds: name -> content hash."""
    info = httpx.get(f"{reference.url}/v1/shadow/info", headers=reference.headers, timeout=30).json()
    return {a["name"]: a["sha256"] for a in info["adapters"]}


def remote(reference: RunningServer) -> list[str]:
    return ["--shadow-reference-url", reference.url, "--shadow-reference-token", REFERENCE_TOKEN]


def test_the_reference_holds_four_adapters_on_one_base(lora_reference, lora, demo_model):
    """The reference's memory with 1 and 4 adapters: each costs its own weights (fp32, and
    bf16 on the noise-floor copy), the base is shared."""
    process = psutil.Process(lora_reference.process.pid)
    one = process.memory_info().rss
    extra = {"x1": lora["b"], "x2": lora["wrong_alpha"], "x3": lora["rank32"]}
    for name, path in extra.items():
        reply = httpx.post(f"{lora_reference.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)},
                           headers=lora_reference.headers, timeout=120)
        assert reply.status_code == 200, reply.text
    four = process.memory_info().rss
    assert set(held(lora_reference)) == {"a", *extra}
    adapter_bytes = sum(p.stat().st_size for path in extra.values() for p in path.glob("*.safetensors")) * 6 // 4
    base_bytes = (demo_model / "model.safetensors").stat().st_size
    print(f"\n[reference memory] 1 adapter: {one / 2**20:.0f} MiB RSS; 4 adapters: {four / 2**20:.0f} MiB "
          f"(+{(four - one) / 2**20:.0f} MiB; the 3 adapters' weights in fp32 + bf16: {adapter_bytes / 2**20:.0f} MiB; "
          f"one fp32 base: {base_bytes / 2**20:.0f} MiB)")
    assert four - one < base_bytes / 2  # not a base (nor its bf16 noise copy) per adapter
    for name in extra:
        assert httpx.post(f"{lora_reference.url}/v1/unload_lora_adapter", json={"lora_name": name},
                          headers=lora_reference.headers, timeout=60).status_code == 200
    assert set(held(lora_reference)) == {"a"}


@pytest.fixture(scope="module")
def fp32_server(demo_model, lora, lora_reference, tmp_path_factory) -> RunningServer:
    """a (held by the reference) and b (loaded on it by this server), shadowed on the remote reference."""
    server = start_server(
        ["--model", str(demo_model), "--dtype", "float32", *VLLM, "--lora-modules", f"a={lora['a']}",
         "--lora-modules", f"b={lora['b']}", "--max-loras", "2", "--max-cpu-loras", "3",
         "--allow-runtime-lora-updating", "true", "--shadow-allow-header", "true", *remote(lora_reference),
         "--shadow-noise-floor", "off"],
        tmp_path_factory.mktemp("lora-fp32") / "server.log", api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(fp32_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fp32_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def greedy(client: openai.OpenAI, model: str, prompt: str, tokens: int = GREEDY_TOKENS, **extra) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=tokens, temperature=0, **extra)
    assert reply.model == model
    return reply.choices[0].message.content


def metric_samples(server: RunningServer) -> list:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name.startswith("shadow_")]


def total(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def wait_compared(server: RunningServer, want: dict[str, int], timeout: float = 300) -> list:
    deadline = time.monotonic() + timeout
    while True:
        samples = metric_samples(server)
        done = {a: total(samples, "shadow_samples_total", adapter=a, outcome="compared") for a in want}
        if all(done[a] >= n for a, n in want.items()):
            return samples
        assert time.monotonic() < deadline, f"compared {done}, wanted {want}"
        assert not any(total(samples, "shadow_samples_total", adapter=a, outcome="error") for a in want)
        time.sleep(0.5)


def verdict(server: RunningServer, adapter: str) -> dict:
    reply = httpx.get(f"{server.url}/v1/shadow/verdict", params={"adapter": adapter, "trajectory": "true"},
                      headers=server.headers, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


# --- fp32: serving, exactness, run-time loading --------------------------------------------


def test_models_lists_the_base_and_each_adapter_with_its_parent(client, lora, lora_reference):
    assert held(lora_reference) == {"a": adapter_sha256(lora["a"]), "b": adapter_sha256(lora["b"])}  # b: the server's load
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {MODEL_NAME, "a", "b"}
    assert cards["a"].parent == cards["b"].parent == MODEL_NAME
    assert cards["a"].root == str(lora["a"]) and getattr(cards[MODEL_NAME], "parent", None) is None
    assert client.models.retrieve("b").id == "b"


def test_each_adapter_answers_as_transformers_and_peft_do_in_fp32(client, demo_model, lora, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    served = {(m, p): greedy(client, m, p) for m in ("a", "b", MODEL_NAME) for p in GREEDY_PROMPTS}
    for name in ("a", "b"):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32),
                                          lora[name]).eval()
        for prompt in GREEDY_PROMPTS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_dict=True)["input_ids"]
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY_TOKENS, do_sample=False)
            want = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
            assert served[(name, prompt)] == want, (name, prompt)
        # The adapter changes the answers, and the distribution under every one of them.
        assert any(served[(name, p)] != served[(MODEL_NAME, p)] for p in GREEDY_PROMPTS)
        assert mean_gap(scored_text(client, name), scored_text(client, MODEL_NAME)) > 0.01
    assert mean_gap(scored_text(client, "a"), scored_text(client, "b")) > 0.01


TEXT = "The water cycle moves water between the oceans, the air and the land, driven by the heat of the sun."


def scored_text(client: openai.OpenAI, model: str) -> list[float]:
    """The log-prob of each token of TEXT, teacher-forced (completions, max_tokens 0, echo)."""
    reply = client.completions.create(model=model, prompt=TEXT, max_tokens=0, echo=True, logprobs=0)
    assert reply.model == model
    return reply.choices[0].logprobs.token_logprobs[1:]


def mean_gap(x: list[float], y: list[float]) -> float:
    return sum(abs(a - b) for a, b in zip(x, y, strict=True)) / len(x)


def test_the_shadow_finds_fp32_mounted_adapters_identical_to_their_reference(fp32_server, client):
    before = metric_samples(fp32_server)
    shadow = {"X-Shadow": "always"}
    jobs = [(m, p) for m in ("a", "b", MODEL_NAME) for p in BUILTIN_PROMPTS[2:6]]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: greedy(client, *job, tokens=32, extra_headers=shadow), jobs))
    want = {a: total(before, "shadow_samples_total", adapter=a, outcome="compared") + 4 for a in ("a", "b", "")}
    after = wait_compared(fp32_server, want)
    for adapter in ("a", "b", ""):
        n = total(after, "shadow_token_kl_divergence_count", adapter=adapter, comparison="candidate") - \
            total(before, "shadow_token_kl_divergence_count", adapter=adapter, comparison="candidate")
        kl = total(after, "shadow_token_kl_divergence_sum", adapter=adapter, comparison="candidate") - \
            total(before, "shadow_token_kl_divergence_sum", adapter=adapter, comparison="candidate")
        print(f"\n[fp32 mounted {adapter or 'base'}] tokens {n:.0f}, mean KL {kl / n:.2e}")
        assert n >= 4 and kl / n <= 1e-8
        assert total(after, "shadow_sequences_total", adapter=adapter, result="hard") == 0
        report = verdict(fp32_server, adapter)
        assert report["adapter"] == adapter and report["candidate"]["sequences"] >= 4
    reply = httpx.get(f"{fp32_server.url}/v1/shadow/verdict", params={"adapter": "nope"}, headers=fp32_server.headers)
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "adapter"


def load(server: RunningServer, name: str, path: Path, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra},
                      headers=server.headers, timeout=300)


def unload(server: RunningServer, name: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=server.headers,
                      timeout=300)


def test_an_adapter_loaded_at_run_time_is_served_and_shadowed_until_unloaded(fp32_server, client, lora, lora_reference):
    assert httpx.post(f"{fp32_server.url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(lora["b"])},
                      timeout=30).status_code == 401  # behind the API key
    reply = load(fp32_server, "c", lora["b"])
    assert reply.status_code == 200 and "Success" in reply.text
    assert {m.id for m in client.models.list().data} == {MODEL_NAME, "a", "b", "c"}
    assert held(lora_reference)["c"] == adapter_sha256(lora["b"])  # loaded on the reference first
    answer = greedy(client, "c", GREEDY_PROMPTS[0], extra_headers={"X-Shadow": "always"})
    assert answer == greedy(client, "b", GREEDY_PROMPTS[0])  # the same weights as b
    wait_compared(fp32_server, {"c": 1})
    assert verdict(fp32_server, "c")["candidate"]["sequences"] == 1
    full = load(fp32_server, "d", lora["a"])  # a, b, c mounted: --max-cpu-loras 3
    assert full.status_code == 400 and "--max-cpu-loras" in full.json()["error"]["message"]

    assert unload(fp32_server, "c").status_code == 200
    assert "c" not in held(lora_reference)  # unloaded there too: this server had loaded it
    with pytest.raises(openai.NotFoundError):
        greedy(client, "c", GREEDY_PROMPTS[0])
    assert httpx.get(f"{fp32_server.url}/v1/shadow/verdict", params={"adapter": "c"},
                     headers=fp32_server.headers).status_code == 404
    assert unload(fp32_server, "c").status_code == 404
    # Its series stay readable after the unload (retired, not dropped at once).
    assert total(metric_samples(fp32_server), "shadow_samples_total", adapter="c", outcome="compared") == 1


@pytest.mark.parametrize("case, status, words", [
    ("missing", 404, "no LoRA adapter there"),
    ("rank32", 400, "--max-lora-rank 16"),
    ("foreign", 400, "trained for another base"),
    ("duplicate", 400, "already been loaded"),
    ("base name", 400, "conflicts with the served base model"),
])
def test_a_bad_adapter_is_refused_on_load_and_the_server_keeps_serving(fp32_server, client, lora, case, status, words):
    name, path = {"missing": ("m", lora["a"].parent / "nope"), "rank32": ("r", lora["rank32"]),
                  "foreign": ("f", lora["foreign"]), "duplicate": ("a", lora["b"]),
                  "base name": (MODEL_NAME, lora["a"])}[case]
    reply = load(fp32_server, name, path)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    assert {m.id for m in client.models.list().data} == {MODEL_NAME, "a", "b"}
    assert greedy(client, "a", GREEDY_PROMPTS[0], tokens=4)


# --- bf16: the verdict per adapter ---------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_server(demo_model, lora, lora_reference, tmp_path_factory) -> RunningServer:
    """`a` as trained, and `wrong`: a with lora_alpha doubled, judged against a as trained
    (the reference's own copy, loaded on the remote reference under `wrong`)."""
    server = start_server(
        ["--model", str(demo_model), "--dtype", "bfloat16", *VLLM, "--lora-modules", f"a={lora['a']}",
         "--lora-modules", f"wrong={lora['wrong_alpha']}", "--shadow-reference-lora-modules", f"wrong={lora['a']}",
         "--max-loras", "2", "--shadow-rate", "1.0", *remote(lora_reference)],
        tmp_path_factory.mktemp("lora-bf16") / "server.log")
    yield server
    server.stop()


def test_bf16_mounted_adapters_are_judged_each_on_its_own(bf16_server):
    bf16 = openai.OpenAI(base_url=f"{bf16_server.url}/v1", api_key="none", max_retries=0, timeout=300)
    jobs = [("a", p, 64) for p in BUILTIN_PROMPTS[:16]] + [("wrong", p, 48) for p in BUILTIN_PROMPTS[16:26]]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda job: greedy(bf16, job[0], job[1], tokens=job[2]), jobs))
    samples = wait_compared(bf16_server, {"a": 16, "wrong": 10}, timeout=600)
    good, bad = verdict(bf16_server, "a"), verdict(bf16_server, "wrong")
    for name, report in (("a", good), ("wrong", bad)):
        v = report["verdict"]
        print(f"\n[bf16 mounted {name}] {v['status']}: KL ratio {v['kl_ratio']}, reasons {v['reasons'][:2]}")
    assert good["verdict"]["status"] == "pass", good["verdict"]["reasons"]
    assert bad["verdict"]["status"] == "fail", bad["verdict"]["reasons"]
    assert good["candidate"]["sequences"] == 16 and bad["candidate"]["sequences"] == 10
    assert good["reference"] == bad["reference"] == MODEL_NAME  # the remote reference's name
    # The gauges say the same, per adapter; the base's lane saw nothing.
    assert total(samples, "shadow_verdict_state", adapter="a") == 1
    assert total(samples, "shadow_verdict_state", adapter="wrong") == -1
    assert total(samples, "shadow_samples_total", adapter="") == 0
    assert verdict(bf16_server, "")["candidate"] is None


# --- the bug the shadow found: vLLM's CPU LoRA ops without shadowserve's fix -------------


@pytest.fixture(scope="module")
def unfixed_server(demo_model, lora, tmp_path_factory) -> RunningServer:
    server = start_server(
        ["--model", str(demo_model), "--dtype", "float32", *VLLM, "--lora-modules", f"a={lora['a']}",
         "--lora-modules", f"b={lora['b']}", "--max-loras", "2", "--shadow-rate", "1.0"],
        tmp_path_factory.mktemp("lora-unfixed") / "server.log", env={"SHADOWSERVE_VLLM_LORA_FIX": "0"})
    yield server
    server.stop()


def test_without_the_fix_the_shadow_catches_base_requests_given_an_adapter(unfixed_server):
    client = openai.OpenAI(base_url=f"{unfixed_server.url}/v1", api_key="none", max_retries=0, timeout=300)
    jobs = [(m, p) for p in BUILTIN_PROMPTS[6:12] for m in (MODEL_NAME, "a", "b")]  # base rows batched beside adapters'
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda job: greedy(client, *job, tokens=32), jobs))
    samples = wait_compared(unfixed_server, {"": 6, "a": 6, "b": 6})
    kl = {a: total(samples, "shadow_token_kl_divergence_sum", adapter=a, comparison="candidate") /
          total(samples, "shadow_token_kl_divergence_count", adapter=a, comparison="candidate") for a in ("", "a", "b")}
    print(f"\n[fp32, vLLM's LoRA ops unfixed] mean token KL: base {kl['']:.2e}, a {kl['a']:.2e}, b {kl['b']:.2e}")
    assert kl["a"] <= 1e-8 and kl["b"] <= 1e-8  # adapter rows are right
    assert kl[""] > 1e-5  # base rows got an adapter's update: 1e3 x what an exact fp32 pipeline shows
    assert "shadowserve's fix is not loaded" in unfixed_server.log_path.read_text()
