"""A remote reference unreachable at start: the server's shadow path keeps sampled
requests queued while the scorer's watch retries in the background; once the reference
answers it is checked as at start (vocabulary, noise-floor dtype): up, or disabled
loudly on a mismatch (then samples are errors), never a crash. Back after an outage it
is checked again, and must be the same reference."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import pytest
from prometheus_client import CollectorRegistry

import shadow.remote_scorer as remote
from shadow.factory import build_shadow_path, load_reference
from shadow.queue import ShadowSample, ShadowSequence
from shadow.remote_scorer import ReferenceUnavailableError
from shadow.scoring import ReferenceInfo, ShadowReferenceError, vocab_fingerprint
from shadow.settings import ShadowSettings
from tests.scorers import LP

URL = "http://127.0.0.1:9"  # the discard port: nothing answers


class Tokenizer:
    def get_vocab(self):
        return {"a": 0, "b": 1, "c": 2}

    def __len__(self):
        return 3

    def decode(self, ids):
        return ""


VOCAB = vocab_fingerprint(Tokenizer())


def info(**overrides) -> ReferenceInfo:
    return ReferenceInfo(**{"name": "ref", "vocab_size": VOCAB.size, "vocab_sha256": VOCAB.sha256, "dtype": "float32",
                            "noise_dtype": "float32", **overrides})


class FakeService:
    """Stands in for GET /v1/shadow/info: down until `up` is set, then `answer`."""

    def __init__(self, answer: ReferenceInfo):
        self.answer, self.up, self.calls = answer, False, []

    def __call__(self, url, token, timeout):
        self.calls.append(time.monotonic())
        if not self.up:
            raise ReferenceUnavailableError(f"remote reference {url} unavailable: connection refused")
        return self.answer


def settings(**overrides) -> ShadowSettings:
    return ShadowSettings(**{"shadow_rate": 1.0, "shadow_reference_url": URL, "shadow_timeout_s": 5.0, **overrides})


def sample() -> ShadowSample:
    return ShadowSample("r", "cand", [ShadowSequence([5, 6], [1, 1], [dict(LP)] * 2)])


def build(service: FakeService, monkeypatch, **overrides):
    monkeypatch.setattr(remote, "fetch_info", service)
    real = remote.RemoteScorer.monitor
    monkeypatch.setattr(remote.RemoteScorer, "monitor",
                        lambda self, check, **_: real(self, check, first_delay=0.02, max_delay=0.08, probe_s=0.02))
    config = settings(**overrides)
    scorer = load_reference(config, None, Tokenizer(), defer_unreachable=True)
    path = build_shadow_path(config, scorer, model_name="cand", serving_dtype="float32", candidate_tokenizer=Tokenizer(),
                             registry=CollectorRegistry())
    path._rng = random.Random(0)
    return scorer, path


def outcome(path, name: str) -> float:
    return path.metrics._samples.labels(**path.metrics._base, outcome=name)._value.get()


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_unreachable_at_start_is_an_error_outside_the_server(monkeypatch):
    """verify (and anything not deferring) still fails at once, as before."""
    monkeypatch.setattr(remote, "fetch_info", FakeService(info()))
    with pytest.raises(ReferenceUnavailableError, match="unavailable"):
        load_reference(settings(), None, Tokenizer())


def test_samples_wait_until_the_reference_comes_up_then_it_is_checked_and_used(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="shadow.remote_scorer")
    service = FakeService(info())
    scorer, path = build(service, monkeypatch, shadow_reference_name="late-ref")
    assert scorer.state == "unreachable" and not scorer.ready and not scorer.reachable
    assert path.reference_name == "late-ref"
    path.submit(sample())
    path.submit(sample())
    assert outcome(path, "error") == 0 and path._queue.qsize() == 2  # evidence kept for a reference not there yet
    wait_for(lambda: len(service.calls) >= 6)  # the start-up attempt, then the background thread's
    gaps = [b - a for a, b in zip(service.calls[1:], service.calls[2:])]
    assert all(gap >= 0.95 * delay for gap, delay in zip(gaps, [0.02, 0.04, 0.08, 0.08]))  # doubling, capped
    service.up = True
    wait_for(lambda: scorer.ready)
    assert scorer.vocab == VOCAB and scorer.noise_dtype == "float32" and scorer.reachable
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1 and sum("is up" in r.getMessage() for r in caplog.records) == 1  # once per state change
    # Down again (a restart), then back: not reachable meanwhile, up again once it answers as the same reference.
    service.up = False
    wait_for(lambda: not scorer.reachable)
    service.up = True
    wait_for(lambda: scorer.reachable)
    assert scorer.state == "up" and sum("is up" in r.getMessage() for r in caplog.records) == 2
    asyncio.run(asyncio.wait_for(path.scorer.close(), 5))


def test_an_odd_answer_once_it_was_up_is_an_outage_not_a_disable(monkeypatch):
    """A 500, a 401 or an ingress's page from an address that served the reference: retried,
    the up gauge 0 meanwhile, never the shadow turned off for good."""
    service = FakeService(info())
    scorer, path = build(service, monkeypatch)
    service.up = True
    wait_for(lambda: scorer.ready and scorer.reachable)
    answer = service.answer
    service.answer = None

    def odd(url, token, timeout):
        service.calls.append(time.monotonic())
        if service.answer is None:
            raise ShadowReferenceError(f"remote reference {url} unavailable: it answered 500: oops")
        return service.answer

    monkeypatch.setattr(remote, "fetch_info", odd)
    wait_for(lambda: not scorer.reachable)
    assert scorer.state == "up"
    service.answer = answer
    wait_for(lambda: scorer.reachable)
    assert scorer.state == "up"
    asyncio.run(asyncio.wait_for(path.scorer.close(), 5))


def test_a_reference_back_as_another_model_disables_the_path(monkeypatch, caplog):
    service = FakeService(info())
    scorer, path = build(service, monkeypatch)
    service.up = True
    wait_for(lambda: scorer.ready)
    service.answer = info(name="another-model")
    wait_for(lambda: scorer.state == "disabled")
    assert "is another model now (another-model, was ref)" in scorer.problem
    path.submit(sample())
    assert outcome(path, "error") == 1
    asyncio.run(asyncio.wait_for(path.scorer.close(), 5))


@pytest.mark.parametrize(("answer", "problem"), [
    (info(vocab_sha256="0" * 64), "does not share the candidate's tokenizer"),
    (info(noise_dtype="bfloat16"), "computes its noise floor in bfloat16"),
])
def test_a_mismatch_found_late_disables_the_path_loudly(monkeypatch, caplog, answer, problem):
    service = FakeService(answer)
    scorer, path = build(service, monkeypatch)  # down at start
    service.up = True
    wait_for(lambda: scorer.state == "disabled")
    assert problem in scorer.problem
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "DISABLED" in r.getMessage()]
    assert len(errors) == 1 and problem in errors[0].getMessage()
    path.submit(sample())
    assert outcome(path, "error") == 1 and outcome(path, "compared") == 0 and path._queue.qsize() == 0
    with pytest.raises(ShadowReferenceError, match=problem):  # nor would a queued batch compare garbage
        asyncio.run(scorer.score([], 5))
    asyncio.run(asyncio.wait_for(path.scorer.close(), 5))


def test_a_reachable_reference_behaves_as_before(monkeypatch):
    monkeypatch.setattr(remote, "fetch_info", lambda url, token, timeout: info(vocab_sha256="0" * 64))
    with pytest.raises(ShadowReferenceError, match="does not share"):
        load_reference(settings(), None, Tokenizer(), defer_unreachable=True)
    monkeypatch.setattr(remote, "fetch_info", lambda url, token, timeout: info(noise_dtype="bfloat16"))
    scorer = load_reference(settings(), None, Tokenizer(), defer_unreachable=True)
    assert scorer.ready
    with pytest.raises(ShadowReferenceError, match="noise floor in bfloat16"):
        build_shadow_path(settings(), scorer, model_name="cand", serving_dtype="float32", candidate_tokenizer=Tokenizer(),
                          registry=CollectorRegistry())
