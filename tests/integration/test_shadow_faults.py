"""Fault isolation: whatever the reference does, clients get 200 and the same answer,
promptly, and the outcome is counted. Real engine (transformers, SmolLM2 fp32) and the
real HTTP app; the scorers inject the faults."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from server.app import create_app
from server.engines.transformers_engine import TransformersEngine
from server.serving.context import ServingContext
from server.serving.prompts import PromptRenderer
from server.serving.validation import RequestValidator
from server.settings import ServeSettings
from shadow.metrics import ShadowMetrics
from shadow.path import ShadowPath
from shadow.remote_scorer import RemoteScorer
from shadow.scoring import ReferenceInfo
from tests.conftest import MODEL_NAME
from tests.scorers import HangingScorer, RaisingScorer
from tests.servers import free_port

pytestmark = pytest.mark.integration

BODY = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 12, "temperature": 0}


def app_with(demo_model, scorer, **shadow):
    settings = ServeSettings(model=demo_model, engine="transformers", dtype="float32", shadow_allow_header=True,
                             **{"shadow_rate": 1.0, **shadow})

    def load(settings: ServeSettings, registry: CollectorRegistry) -> ServingContext:
        renderer = PromptRenderer.load(settings.model)
        metrics = ShadowMetrics(registry, settings.model_name, scorer.name)
        return ServingContext(
            engine=TransformersEngine.load(settings.model, "float32"), renderer=renderer, model_name=settings.model_name,
            validator=RequestValidator(max_n=4, max_logprobs=20), shadow=ShadowPath(settings, scorer, metrics),
        )

    return create_app(settings, load, CollectorRegistry())


def ready(client: TestClient) -> TestClient:
    deadline = time.monotonic() + 120
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "not ready"
        time.sleep(0.2)
    return client


def outcomes(client: TestClient) -> dict[str, float]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {s.labels["outcome"]: s.value for f in families for s in f.samples if s.name == "shadow_samples_total"}


def wait_for(client, outcome: str, count: int, timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while (seen := outcomes(client)).get(outcome, 0) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    return seen


def timed_answer(client, headers=None) -> tuple[str, float]:
    start = time.perf_counter()
    reply = client.post("/v1/chat/completions", json=BODY, headers=headers or {})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"], time.perf_counter() - start


@pytest.mark.parametrize("scorer, outcome", [(RaisingScorer(), "error"), (HangingScorer(), "error")], ids=["raises", "hangs"])
def test_failing_reference_never_reaches_the_client(demo_model, scorer, outcome):
    """A hanging reference's batches time out and are retried (an outage) until their samples
    are older than --shadow-max-sample-age-s (2 s here): then errors."""
    with TestClient(app_with(demo_model, scorer, shadow_timeout_s=1.0, shadow_max_sample_age_s=2.0)) as client:
        ready(client)
        baseline, baseline_s = timed_answer(client, {"X-Shadow": "never"})
        for _ in range(2):
            answer, seconds = timed_answer(client)
            assert answer == baseline
            assert seconds < baseline_s + 1.0  # the hang is not the client's
        assert wait_for(client, outcome, 2)[outcome] == 2


def test_remote_reference_down(demo_model):
    """Its sample waits and is retried (the up gauge 0) until older than --shadow-max-sample-age-s."""
    dead = f"http://127.0.0.1:{free_port()}"
    scorer = RemoteScorer(dead, None, 2.0, ReferenceInfo(name="remote", vocab_size=49152, vocab_sha256="x", dtype="float32"))
    with TestClient(app_with(demo_model, scorer, shadow_max_sample_age_s=2.0)) as client:
        ready(client)
        baseline, _ = timed_answer(client, {"X-Shadow": "never"})
        assert timed_answer(client)[0] == baseline
        assert wait_for(client, "error", 1)["error"] == 1
        families = {s.name: s.value for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples}
        assert families["shadow_reference_retries_total"] >= 1 and families["shadow_reference_up"] == 0


def test_full_queue_drops_and_counts(demo_model):
    scorer = HangingScorer()
    with TestClient(app_with(demo_model, scorer, shadow_queue_size=1, shadow_timeout_s=600, shadow_drain_s=0)) as client:
        ready(client)
        baseline, _ = timed_answer(client, {"X-Shadow": "never"})
        # The worker holds one sample (hanging), the queue one more; the rest are dropped.
        answers = [timed_answer(client)[0] for _ in range(4)]
        assert answers == [baseline] * 4
        assert wait_for(client, "dropped", 2)["dropped"] == 2


def test_invalid_shadow_header_is_a_client_error(demo_model):
    with TestClient(app_with(demo_model, RaisingScorer())) as client:
        ready(client)
        reply = client.post("/v1/chat/completions", json=BODY, headers={"X-Shadow": "maybe"})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "X-Shadow"


def test_every_sampled_request_ends_as_one_outcome(demo_model):
    """Sampled, then refused (n over the limit: after admission), aborted by its client,
    scored with an error: each admitted request is exactly one outcome, none lost."""
    with TestClient(app_with(demo_model, RaisingScorer())) as client:
        ready(client)
        assert client.post("/v1/chat/completions", json={**BODY, "n": 10}).status_code == 400
        assert client.post("/v1/chat/completions", json={**BODY, "max_tokens": 9000}).status_code == 400
        timed_answer(client)
        wait_for(client, "error", 1)
        families = text_string_to_metric_families(client.get("/metrics").text)
        sampled = sum(s.value for f in families for s in f.samples if s.name == "shadow_sampled_total")
        assert sampled == 3
        assert sum(outcomes(client).values()) == sampled, outcomes(client)
