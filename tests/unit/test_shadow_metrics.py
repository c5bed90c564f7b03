"""Shadow metrics on a fresh registry: names, labels, and values from a comparison."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from shadow.compare import PositionStats, compare_sequence
from shadow.metrics import ShadowMetrics

LABELS = {"model": "cand", "reference": "ref", "variant": "canary", "adapter": ""}
CMP = {**LABELS, "comparison": "candidate"}


@pytest.fixture
def registry():
    return CollectorRegistry()


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels)


def test_every_series_exists_at_zero_before_any_event(registry):
    ShadowMetrics(registry, "cand", "ref", {"variant": "canary"})
    for outcome in ("compared", "dropped", "skipped", "error"):
        assert value(registry, "shadow_samples_total", **LABELS, outcome=outcome) == 0
    for result in ("identical", "near_tie", "hard"):
        assert value(registry, "shadow_sequences_total", **CMP, result=result) == 0
    assert value(registry, "shadow_queue_depth", **LABELS) == 0
    assert value(registry, "shadow_token_kl_divergence_count", **CMP) == 0
    assert value(registry, "shadow_reference_seconds_count", **LABELS) == 0


def test_a_diverged_sequence_is_recorded(registry):
    metrics = ShadowMetrics(registry, "cand", "ref", {"variant": "canary"})
    same = {1: math.log(0.7), 2: math.log(0.3)}
    flipped = PositionStats({1: math.log(0.1), 2: math.log(0.9)}, [2, 1], [math.log(0.9), math.log(0.1)])
    agree = PositionStats(same, [1, 2], [math.log(0.7), math.log(0.3)])
    cmp = compare_sequence([1, 1, 1], [same] * 3, [agree, agree, flipped], near_tie_margin=0.25)
    metrics.sequence(cmp)
    assert value(registry, "shadow_sequences_total", **CMP, result="hard") == 1
    assert value(registry, "shadow_first_divergence_position_tokens_sum", **CMP) == 2
    assert value(registry, "shadow_compared_sequence_tokens_sum", **CMP) == 3
    assert value(registry, "shadow_tokens_total", **CMP, top1="same") == 2
    assert value(registry, "shadow_tokens_total", **CMP, top1="different") == 1
    assert value(registry, "shadow_token_kl_divergence_count", **CMP) == 3
    assert value(registry, "shadow_token_kl_divergence_sum", **CMP) == pytest.approx(cmp.tokens.kl.sum())
    # Δp of the emitted token 1 at the last position: 0.7 - 0.1 = 0.6, elsewhere 0.
    assert value(registry, "shadow_token_delta_p_gain_total", **CMP) == pytest.approx(0.6)
    assert value(registry, "shadow_token_delta_p_loss_total", **CMP) == 0
    assert value(registry, "shadow_token_delta_p_squares_total", **CMP) == pytest.approx(0.36)
    assert value(registry, "shadow_token_delta_p_bucket", **CMP, le="0.4") == 2
    assert value(registry, "shadow_token_delta_p_bucket", **CMP, le="0.6") == 3


def test_kl_buckets_cover_one_in_a_million_to_ten_nats(registry):
    metrics = ShadowMetrics(registry, "cand", "ref")
    edges = [float(s.labels["le"]) for s in metrics._kl.collect()[0].samples if s.name.endswith("_bucket")]
    finite = [e for e in edges if math.isfinite(e)]
    assert min(finite) <= 1e-6 and max(finite) >= 10
    # at least two edges per decade in between, so histogram_quantile is readable
    for decade in range(-6, 1):
        assert sum(10.0**decade <= e < 10.0 ** (decade + 1) for e in finite) >= 2


def test_a_sequence_after_its_series_were_removed_counts_on_live_series(registry):
    """The per-sequence children are bound once per (adapter, comparison); removing an
    adapter's series drops its bound children, so a later sequence recreates the series
    (as `.labels()` did) rather than counting on detached children no scrape sees."""
    metrics = ShadowMetrics(registry, "cand", "ref", comparisons=("candidate", "noise_floor"))
    lora = metrics.for_adapter("lora")
    same = {1: math.log(0.7), 2: math.log(0.3)}
    agree = PositionStats(same, [1, 2], [math.log(0.7), math.log(0.3)])
    cmp = compare_sequence([1, 1], [same] * 2, [agree, agree], near_tie_margin=0.25)
    lora_cmp = {"model": "cand", "reference": "ref", "adapter": "lora", "comparison": "candidate"}
    metrics.sequence(cmp)
    lora.sequence(cmp)
    lora.sequence(cmp, "noise_floor")
    lora.remove()
    assert value(registry, "shadow_sequences_total", **lora_cmp, result="identical") is None
    lora.sequence(cmp)
    assert value(registry, "shadow_sequences_total", **lora_cmp, result="identical") == 1
    assert value(registry, "shadow_tokens_total", **lora_cmp, top1="same") == 2
    assert value(registry, "shadow_first_divergence_position_tokens_count", **lora_cmp) is None  # none diverged
    # the base model's series were not touched
    base_cmp = {**lora_cmp, "adapter": ""}
    assert value(registry, "shadow_sequences_total", **base_cmp, result="identical") == 1
    metrics.sequence(cmp)
    assert value(registry, "shadow_sequences_total", **base_cmp, result="identical") == 2
