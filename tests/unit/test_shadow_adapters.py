"""Mounted LoRA adapters on the shadow path (shadow/lanes.py): each adapter is its own
lane, with its own series (`adapter` label), history and verdict; a batch never mixes
adapters and is scored with its adapter applied; unmounting skips what its lane had
queued; retired series stay bounded. The reference is a double that records which
adapter each batch asked for and flips one adapter's tokens."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from shadow.lanes import Lanes
from shadow.metrics import NOISE_FLOOR, ShadowMetrics
from shadow.path import ShadowPath
from shadow.queue import ShadowSample, ShadowSequence
from shadow.settings import ShadowSettings
from tests.scorers import LP, EchoScorer, settle

PROMPT = {"": 5, "a": 6, "b": 7}  # each lane's samples start with its own token: batches can be told apart


class AdapterEcho(EchoScorer):
    """Agrees with the candidate, except on adapter `broken` (a flip at position 0)."""

    def __init__(self, broken: str | None = None, delay: float = 0.0):
        super().__init__(delay=delay)
        self.broken = broken
        self.mounted: list[str] = []
        self.asked: list[tuple[str | None, set[int]]] = []  # per batch: the adapter, the lanes its items came from

    def add_adapter(self, name: str, path: Path) -> None:
        self.mounted.append(name)

    def remove_adapter(self, name: str) -> None:
        self.mounted.remove(name)

    async def score(self, items, top_m, noise_top_k=None, adapter=None):
        self.asked.append((adapter, {item.prompt_ids[0] for item in items}))
        self.flip_at = 0 if adapter is not None and adapter == self.broken else None
        return await super().score(items, top_m, noise_top_k)


def make(scorer, registry=None) -> ShadowPath:
    settings = ShadowSettings(shadow_rate=1.0, shadow_timeout_s=30.0, shadow_noise_floor=True,
                              shadow_verdict_max_sequences=64)
    scorer.enable_noise_floor("bfloat16")
    metrics = ShadowMetrics(registry or CollectorRegistry(), "cand", scorer.name, comparisons=("candidate", NOISE_FLOOR))
    return ShadowPath(settings, scorer, metrics, rng=random.Random(0))


def sample(adapter: str, n: int) -> ShadowSample:
    return ShadowSample(f"{adapter or 'base'}-{n}", "cand",
                        [ShadowSequence([PROMPT[adapter], 9], [1] * 4, [dict(LP)] * 4)], adapter=adapter)


def value(registry, name: str, adapter: str, **labels) -> float:
    return registry.get_sample_value(name, {"model": "cand", "reference": "echo", "adapter": adapter, **labels}) or 0.0


def test_each_adapter_is_judged_in_its_own_lane():
    async def run():
        registry = CollectorRegistry()
        scorer = AdapterEcho(broken="a")
        path = make(scorer, registry)
        await path.add_adapter("a", Path("/adapters/a"))
        await path.add_adapter("b", Path("/adapters/b"))
        assert scorer.mounted == ["a", "b"] and path.adapters == ["a", "b"]
        for n in range(10):  # interleaved, queued before the worker starts: batches must split them
            for adapter in ("", "a", "b"):
                assert path.admit(None, adapter)
                path.submit(sample(adapter, n))
        path.start()
        await settle(lambda: all(value(registry, "shadow_samples_total", a, outcome="compared") == 10 for a in PROMPT))
        reports = {a: await asyncio.to_thread(path.report, None, False, a) for a in PROMPT}
        await path.stop()
        return registry, scorer, reports

    registry, scorer, reports = asyncio.run(run())
    for adapter, lanes in scorer.asked:  # one adapter per batch, and the one its samples named
        assert lanes == {PROMPT[adapter or ""]}
    assert {a for a, _ in scorer.asked} == {None, "a", "b"}
    for adapter in PROMPT:
        assert value(registry, "shadow_sampled_total", adapter) == 10
        broken = 10 if adapter == "a" else 0
        assert value(registry, "shadow_sequences_total", adapter, comparison="candidate", result="hard") == broken
        assert reports[adapter].adapter == adapter and reports[adapter].candidate.sequences == 10
        assert reports[adapter].candidate.hard == broken
    assert reports["a"].verdict.status == "fail"  # the broken adapter fails; the others are untouched by it
    assert reports["b"].verdict.status != "fail" and reports[""].verdict.status != "fail"
    assert value(registry, "shadow_verdict_state", "a") == -1
    assert value(registry, "shadow_verdict_state", "b") == value(registry, "shadow_verdict_state", "") >= 0


def test_unmounting_skips_what_its_lane_had_queued():
    async def run():
        registry = CollectorRegistry()
        scorer = AdapterEcho(delay=0.3)
        path = make(scorer, registry)
        await path.add_adapter("a", Path("/adapters/a"))
        path.start()
        path.submit(sample("", 0))  # taken by the worker: scoring while "a" queues behind it
        await settle(lambda: scorer.asked)
        for n in range(3):
            assert path.admit(None, "a")
            path.submit(sample("a", n))
        path.submit(sample("", 1))
        assert value(registry, "shadow_queue_depth", "a") == 3
        await path.remove_adapter("a")  # waits for the batch being scored, then purges
        figures = {
            "skipped": value(registry, "shadow_samples_total", "a", outcome="skipped"),
            "depth": value(registry, "shadow_queue_depth", "a"),
            "admitted after": path.admit(None, "a"),
            "mounted": list(scorer.mounted),
        }
        path.submit(sample("a", 9))  # a request that was still running when it was unmounted
        figures["late"] = value(registry, "shadow_samples_total", "a", outcome="skipped")
        await settle(lambda: value(registry, "shadow_samples_total", "", outcome="compared") == 2)
        await asyncio.wait_for(path._queue.join(), 2)  # every sample taken out is accounted for (a carry too)
        with pytest.raises(KeyError):
            path.report(adapter="a")
        await path.stop()
        return figures, scorer

    figures, scorer = asyncio.run(run())
    assert figures == {"skipped": 3, "depth": 0, "admitted after": False, "mounted": [], "late": 4}
    assert all(adapter is None for adapter, _ in scorer.asked)  # nothing of "a" reached the reference


def test_an_adapter_the_reference_does_not_hold_is_not_sampled():
    path = make(AdapterEcho())
    assert not path.admit(None, "never-mounted")
    assert path.admit(None, "")


def test_retired_series_stay_bounded_and_a_remount_keeps_counting():
    registry = CollectorRegistry()
    lanes = Lanes(ShadowMetrics(registry, "cand", "ref"), max_sequences=8, retired_max=2)
    for n in range(6):
        lanes.add(f"t{n}").metrics.sample("compared")
        lanes.retire(f"t{n}")
    names = {s.labels["adapter"] for m in registry.collect() for s in m.samples if "adapter" in s.labels}
    assert names == {"", "t4", "t5"}  # the base, and the two newest retired
    lane = lanes.add("t5")  # mounted again: its counter goes on from where it was
    lane.metrics.sample("compared")
    assert registry.get_sample_value("shadow_samples_total", {"model": "cand", "reference": "ref", "adapter": "t5",
                                                              "outcome": "compared"}) == 2
    with pytest.raises(ValueError):
        lanes.add("t5")
    with pytest.raises(KeyError):
        lanes.retire("")


def test_a_request_of_an_earlier_mount_is_not_judged_against_a_new_one():
    async def run():
        registry = CollectorRegistry()
        scorer = AdapterEcho()
        path = make(scorer, registry)
        await path.add_adapter("a", Path("/adapters/a-v1"), adapter_id=1)
        assert path.admit(None, "a", 1)  # a request starts on v1 ...
        await path.remove_adapter("a")
        await path.add_adapter("a", Path("/adapters/a-v2"), adapter_id=2)  # ... "a" is v2 when it ends
        assert not path.admit(None, "a", 1)
        path.submit(ShadowSample("late", "cand", [ShadowSequence([6, 9], [1] * 4, [dict(LP)] * 4)], adapter="a",
                                 adapter_id=1))
        path.start()
        path.submit(ShadowSample("new", "cand", [ShadowSequence([6, 9], [1] * 4, [dict(LP)] * 4)], adapter="a",
                                 adapter_id=2))
        await settle(lambda: value(registry, "shadow_samples_total", "a", outcome="compared") == 1)
        history = [c.request_id for c in path.lane("a").history.snapshot()]
        await path.stop()
        return registry, history

    registry, history = asyncio.run(run())
    assert history == ["new"]
    assert value(registry, "shadow_samples_total", "a", outcome="skipped") == 1


def test_an_unloaded_adapters_verdict_is_gone_and_a_reload_starts_undecided():
    registry = CollectorRegistry()
    lanes = Lanes(ShadowMetrics(registry, "cand", "ref"), max_sequences=8)
    lane = lanes.add("a", adapter_id=1)
    lane.metrics.verdict("fail", True, {}, 50, 1.0)
    lane.metrics.sample("compared", 50)
    labels = {"model": "cand", "reference": "ref", "adapter": "a"}
    assert registry.get_sample_value("shadow_verdict_state", labels) == -1
    lanes.retire("a")  # no alert or canary gate may read a verdict on weights no longer served
    assert registry.get_sample_value("shadow_verdict_state", labels) is None
    assert registry.get_sample_value("shadow_queue_depth", labels) is None
    assert registry.get_sample_value("shadow_samples_total", {**labels, "outcome": "compared"}) == 50
    lanes.add("a", adapter_id=2)
    assert registry.get_sample_value("shadow_verdict_state", labels) == 0
    assert registry.get_sample_value("shadow_verdict_sequences", labels) == 0
    lanes.add("never", adapter_id=3)
    lanes.retire("never", served=False)  # a mount rolled back: nothing left behind
    assert not [s for m in registry.collect() for s in m.samples if s.labels.get("adapter") == "never"]
