"""/metrics carries vLLM's own request metrics, and a client that leaves mid-stream
aborts its engine request (seen in vLLM's own counters)."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.integration


def samples(server) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(metrics, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= ls)


def test_vllm_request_metrics_after_traffic(vllm_server):
    before = samples(vllm_server)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    for _ in range(2):
        assert httpx.post(f"{vllm_server.url}/v1/chat/completions", json=body, headers=vllm_server.headers, timeout=60).status_code == 200
    after = samples(vllm_server)
    assert total(after, "vllm:request_success_total") - total(before, "vllm:request_success_total") == 2
    assert total(after, "vllm:generation_tokens_total") - total(before, "vllm:generation_tokens_total") == 10
    assert total(after, "vllm:e2e_request_latency_seconds_count") >= 2
    assert total(after, "vllm:time_to_first_token_seconds_count") >= 2
    served = total(after, "shadowserve_http_requests_total", route="/v1/chat/completions", status="200")
    assert served >= 2


def test_client_disconnect_aborts_the_engine_request(vllm_server):
    generated = lambda: total(samples(vllm_server), "vllm:generation_tokens_total")  # noqa: E731
    running = lambda: total(samples(vllm_server), "vllm:num_requests_running")  # noqa: E731
    before = generated()
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1900, "stream": True, "temperature": 1.0, "seed": 3}
    with httpx.stream("POST", f"{vllm_server.url}/v1/chat/completions", json=body, headers=vllm_server.headers, timeout=60) as response:
        assert response.status_code == 200
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data:")
            if received == 3:
                break
    # Leaving the `with` block closed the connection after three events. vLLM does not
    # count internal aborts by reason, so the evidence is that the request leaves the
    # engine and token generation stops far short of the 1900 tokens asked for.
    deadline = time.monotonic() + 15
    while running() > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0, "the engine request still runs after the client left"
    stopped_at = generated()
    time.sleep(2)
    assert generated() == stopped_at
    assert stopped_at - before < 1000, f"{stopped_at - before} tokens generated for a client that left"


def test_non_streaming_client_that_hangs_up_aborts_too(vllm_server):
    generated = lambda: total(samples(vllm_server), "vllm:generation_tokens_total")  # noqa: E731
    running = lambda: total(samples(vllm_server), "vllm:num_requests_running")  # noqa: E731
    before = generated()
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1900, "temperature": 1.0, "seed": 4}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{vllm_server.url}/v1/chat/completions", json=body, headers=vllm_server.headers, timeout=2)
    deadline = time.monotonic() + 15
    while running() > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0, "the engine request still runs after the client hung up"
    assert generated() - before < 1000
