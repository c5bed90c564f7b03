"""The fp32 reference over 3 tensor-parallel ranks (torchrun, gloo on CPU) on SmolLM2
(9 heads, 3 KV heads: it splits by 3), against the one-process reference:

- its scores (the same log-probs within 1e-4; the comparison statistics a candidate is
  judged by equal to 1e-6; the noise floor at the one-process level, its bf16 rounding
  order aside);
- two "nodes" on this machine (two torchrun invocations, static rendezvous on
  127.0.0.1): the same results; then a rank killed mid-batch: 503 at once, every rank and
  both launchers gone;
- a vLLM candidate served against it: judged live (a bf16 candidate passes, as against
  the one-process reference); then a rank that hangs: the reference answers 503 at the
  collective timeout and exits, the candidate's clients see nothing of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import psutil
import pytest

from server.verify.inputs import BUILTIN_PROMPTS
from shadow.compare import bucketed_kl, compare_sequence
from shadow.local_scorer import LocalScorer
from shadow.remote_scorer import RemoteScorer
from shadow.scoring import ScoreItem
from tests.conftest import MODEL_NAME, REFERENCE_TOKEN
from tests.servers import RunningServer, free_port, launch, start_server

pytestmark = pytest.mark.integration

SIZE = 3
TIMEOUT_S = 10  # the collective timeout of the module's reference (the hang test waits for it)
MARKER = "SHADOWSERVE_TP_TEST"


def reference_cmd(demo_model, port: int, *extra: str) -> list[str]:
    return ["reference", "--model", str(demo_model), "--port", str(port), "--tokens", REFERENCE_TOKEN,
            "--tensor-parallel-size", str(SIZE), "--device", "cpu", *extra]


def marked(tag: str) -> list[psutil.Process]:
    """Every live process started with this marker in its environment."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and process.environ().get(MARKER) == tag:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def ranks(tag: str) -> list[psutil.Process]:
    """The rank processes (the launchers run torchrun's agent, the ranks `-m server.cli`)."""
    return [p for p in marked(tag) if "server.cli" in " ".join(p.cmdline()) and "torchrun" not in " ".join(p.cmdline())
            and p.environ().get("RANK") is not None]


def wait_gone(tag: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (left := marked(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline())[:120] for p in left]


@pytest.fixture(scope="module")
def tp_reference(demo_model, tmp_path_factory) -> RunningServer:
    """`shadowserve reference --tensor-parallel-size 3`: it launches its ranks itself."""
    tag = uuid.uuid4().hex
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", *reference_cmd(demo_model, port, "--collective-timeout-s", str(TIMEOUT_S))]
    server = launch(cmd, port, tmp_path_factory.mktemp("tp-reference") / "reference.log", api_key=REFERENCE_TOKEN,
                    env={MARKER: tag})
    server.tag = tag
    yield server
    server.stop()
    for process in marked(tag):
        process.kill()


@pytest.fixture(scope="module")
def one_process(demo_model) -> LocalScorer:
    scorer = LocalScorer.load(demo_model, device="cpu")
    scorer.enable_noise_floor("bfloat16")
    return scorer


def sequences(tokenizer) -> list[ScoreItem]:
    texts = [("The capital of France is", " Paris, a city on the Seine where millions of people live and work."),
             ("def fibonacci(n):", "\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)"),
             (BUILTIN_PROMPTS[0], " I am a small language model, trained to answer questions as well as I can.")]
    out = []
    for prompt, output in texts:
        ids = tokenizer.encode(output)
        out.append(ScoreItem(tokenizer.encode(prompt), ids, [[t] for t in ids]))
    return out


def score(url: str, batch: list[ScoreItem]):
    remote = RemoteScorer.connect(url, REFERENCE_TOKEN, timeout=120)
    remote.enable_noise_floor("bfloat16")
    return remote, asyncio.run(remote.score(batch, top_m=5, noise_top_k=8))


def noise_floor(scored) -> float:
    """Mean KL(fp32 reference || its serving-dtype copy) over the noise entries' ids."""
    kls = [bucketed_kl(np.array([p.logprobs[t] for t in n]), np.array(list(n.values())))
           for s in scored for p, n in zip(s.reference, s.noise)]
    return float(np.mean(kls))


def test_the_tensor_parallel_reference_scores_as_one_process(tp_reference, one_process, tokenizer):
    batch = sequences(tokenizer)
    here = one_process.score_sync(batch, top_m=5, noise_top_k=8)
    # A candidate that reads the one-process noise copy's log-probs: the statistics it is
    # judged by, against each reference, on the same ids.
    judged = [ScoreItem(i.prompt_ids, i.output_ids, [list(n) for n in s.noise]) for i, s in zip(batch, here)]
    remote, there = score(tp_reference.url, judged)
    assert remote.name == one_process.name and remote.vocab == one_process.vocab
    assert "tensor parallel over 3 ranks" in remote.info.loaded_as
    worst = 0.0
    for item, a, b in zip(judged, here, there):
        for ids, p, q in zip(item.candidate_ids, a.reference, b.reference):
            worst = max(worst, *(abs(p.logprobs[t] - q.logprobs[t]) for t in ids))
            assert p.top_ids[:1] == q.top_ids[:1]
        candidate = [dict(n) for n in a.noise]
        one, tp = (compare_sequence(item.output_ids, candidate, side.reference, near_tie_margin=0.05) for side in (a, b))
        assert (one.first_divergence, one.result, one.diverged) == (tp.first_divergence, tp.result, tp.diverged)
        assert np.array_equal(one.tokens.top1_same, tp.tokens.top1_same)
        assert tp.tokens.kl == pytest.approx(one.tokens.kl, abs=1e-6)
    print(f"\n[tensor parallel 3] worst log-prob difference from one process: {worst:.2e}")
    assert worst <= 1e-4
    # The noise copy is sharded too: its floor is the one-process floor (the bf16 sums run
    # in another order across ranks, so the two copies' rounding differs position by position).
    one_floor, tp_floor = noise_floor(here), noise_floor(there)
    print(f"[tensor parallel 3] noise floor: one process {one_floor:.3e}, 3 ranks {tp_floor:.3e}")
    assert 0.7 <= tp_floor / one_floor <= 1.4


def test_two_nodes_give_the_same_results_and_a_killed_rank_takes_the_service_down(demo_model, tp_reference, tokenizer,
                                                                                  tmp_path):
    """Node 0 runs ranks 0-1 (and serves HTTP), node 1 rank 2, static rendezvous on 127.0.0.1."""
    tag = uuid.uuid4().hex
    port, master = free_port(), free_port()
    launchers = []
    for node, procs in ((1, 1), (0, 2)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1", "--master-port", str(master),
               "--module", "server.cli", *reference_cmd(demo_model, port)]
        if node == 1:
            log = (tmp_path / "node1.log").open("w")
            launchers.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                              env={**os.environ, MARKER: tag, "PYTHONUNBUFFERED": "1"}))
        else:
            leader = launch(cmd, port, tmp_path / "node0.log", api_key=REFERENCE_TOKEN, env={MARKER: tag})
            launchers.append(leader.process)
    try:
        batch = sequences(tokenizer)
        _, apart = score(leader.url, batch)
        _, together = score(tp_reference.url, batch)
        for a, b in zip(apart, together):  # the same ranks, the same shards: the same numbers
            for p, q in zip(a.reference, b.reference):
                assert [p.logprobs[t] for t in p.logprobs] == pytest.approx([q.logprobs[t] for t in p.logprobs], abs=1e-6)
        assert noise_floor(apart) == pytest.approx(noise_floor(together), rel=1e-4)

        # Rank 2 (node 1) killed while a long batch is in its forward.
        victim = next(p for p in ranks(tag) if p.environ()["RANK"] == "2")
        long = [ScoreItem(list(range(100, 700)), list(range(700, 800)), [[1]] * 100) for _ in range(6)]
        threading.Timer(1.0, victim.kill).start()
        started = time.monotonic()
        reply = httpx.post(f"{leader.url}/v1/shadow/score", headers=leader.headers, timeout=120,
                           json={"items": [{"prompt_ids": i.prompt_ids, "output_ids": i.output_ids,
                                            "candidate_ids": i.candidate_ids} for i in long], "top_m": 5})
        answered = time.monotonic() - started
        print(f"\n[tensor parallel 2 nodes] a rank killed mid-batch: {reply.status_code} after {answered:.1f} s")
        assert reply.status_code == 503, reply.text
        assert "a rank died or timed out" in reply.json()["error"]["message"]
        assert answered < 30
        codes = [p.wait(timeout=60) for p in launchers]
        assert all(code != 0 for code in codes), codes  # both launchers report the failure
        wait_gone(tag)
    finally:
        for process in [*launchers, *marked(tag)]:
            if process.poll() is None if isinstance(process, subprocess.Popen) else process.is_running():
                process.kill()


def test_a_vllm_candidate_is_judged_live_and_a_hung_rank_is_an_outage(tp_reference, demo_model, tmp_path):
    candidate = start_server(
        ["--model", str(demo_model), "--dtype", "bfloat16", "--enforce-eager", "true", "--max-model-len", "1024",
         "--kv-cache-gib", "1", "--shadow-rate", "1.0", "--shadow-reference-url", tp_reference.url,
         "--shadow-reference-token", REFERENCE_TOKEN],
        tmp_path / "candidate.log")
    client = openai.OpenAI(base_url=f"{candidate.url}/v1", api_key="none", max_retries=0, timeout=300)

    def chat(prompt: str, tokens: int = 48) -> str:
        reply = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=tokens, temperature=0)
        return reply.choices[0].message.content

    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda p: chat(p, 32), BUILTIN_PROMPTS[:10]))
        wait_for(candidate, lambda m: m.get('shadow_samples_total{outcome="compared"}', 0) >= 10, 300)
        report = httpx.get(f"{candidate.url}/v1/shadow/verdict", timeout=60).json()
        v = report["verdict"]
        print(f"\n[vLLM bf16 on the 3-rank reference] {v['status']}: KL ratio {v['kl_ratio']}, reasons {v['reasons'][:2]}")
        assert v["status"] == "pass", v["reasons"]
        assert report["reference"] == MODEL_NAME and report["noise_dtype"] == "bfloat16"

        # Rank 1 hangs (stopped): the next batch's collective times out; the service
        # answers 503 and exits; the candidate keeps its samples and serves on.
        rank = {p.environ()["RANK"]: p for p in ranks(tp_reference.tag)}
        victim, leader = rank["1"], rank["0"]
        victim.suspend()
        started = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: chat(p, 8), BUILTIN_PROMPTS[16:20]))
        assert all(answers)  # every client answered
        leader.wait(timeout=TIMEOUT_S + 60)  # rank 0 (the service) exits at the collective timeout
        print(f"[tensor parallel 3] a hung rank: the service (rank 0) exited {time.monotonic() - started:.1f} s "
              "after the stop (4 chats, their shadow batch, the timeout)")
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.resume()  # a stopped process takes torchrun's SIGTERM only once it runs again
        code = tp_reference.process.wait(timeout=60)
        assert code != 0
        log = tp_reference.log_path.read_text(errors="replace")
        assert "timed out" in log.lower() and "tensor parallel: a " in log, log[-2000:]
        wait_gone(tp_reference.tag)
        metrics = wait_for(candidate, lambda m: m.get("shadow_reference_up", 1) == 0, 60)
        assert metrics.get('shadow_samples_total{outcome="error"}', 0) == 0  # kept for the reference's return
        assert chat("Say hello.", 4)
    finally:
        candidate.stop()


def wait_for(server: RunningServer, condition, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = shadow_metrics(server)
        if condition(metrics):
            return metrics
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)


def shadow_metrics(server: RunningServer) -> dict[str, float]:
    """shadow_* series summed by name and outcome (labels other than outcome dropped)."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if not line.startswith("shadow_"):
            continue
        name, value = line.rsplit(" ", 1)
        base = name.split("{", 1)[0]
        outcome = next((part for part in name.split(",") if "outcome=" in part), None)
        key = base if outcome is None else f"{base}{{{outcome.strip('{}')}}}"
        out[key] = out.get(key, 0.0) + float(value)
    return out



def test_no_rank_outlives_its_launcher(demo_model, tmp_path):
    """The launcher SIGKILLed (no chance to stop its ranks): each rank gets SIGTERM from the
    kernel (PR_SET_PDEATHSIG) and the port is free again."""
    tag = uuid.uuid4().hex
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", *reference_cmd(demo_model, port, "--noise-dtype", "none")]
    server = launch(cmd, port, tmp_path / "reference.log", api_key=REFERENCE_TOKEN, env={MARKER: tag})
    assert len(ranks(tag)) == SIZE
    server.process.kill()
    server.process.wait(timeout=10)
    wait_gone(tag, timeout=30)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)
