"""The verdict's gauges (shadow/recording.py) are set from the verdict object
(shadow/report.py `verdict_of`), no report built: they must read exactly what the
report's verdict says, as the gauges were once set from its JSON (an unbounded side at
-inf / +inf, a statistic not judged at NaN), in every case."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from shadow.history import ComparedSequence
from shadow.metrics import ShadowMetrics
from shadow.path import ShadowPath
from shadow.recording import gauge_bounds, publish
from shadow.reference_check import ReferenceCheck
from shadow.report import ShadowReport, _interval, build_report, verdict_of
from shadow.settings import ShadowSettings
from shadow.verdict import CHECKS, Interval, Verdict, VerdictPolicy
from tests.scorers import EchoScorer
from tests.verdict_streams import TOKENS, calibration, comparison, records

POLICY = VerdictPolicy()
REFUSED = ReferenceCheck(trusted=False, reasons=["the reference's log-probs on the probe are not finite"], tokens=12,
                         reference_perplexity=None, candidate_perplexity=3.5, excess_nats=None, max_excess_nats=0.25)
TRUSTED = REFUSED.model_copy(update={"trusted": True, "reasons": [], "reference_perplexity": 3.6, "excess_nats": 0.01})


def fp32(recs: list[ComparedSequence]) -> list[ComparedSequence]:
    """An fp32 deployment: the noise floor is exactly the reference (KL 0, same top-1)."""
    zero = comparison(np.zeros(TOKENS), np.zeros(TOKENS), np.ones(TOKENS, dtype=bool), None, "identical")
    return [replace(r, noise=zero) for r in recs]


def heavy_tailed(n: int = 10) -> list[ComparedSequence]:
    """A few sequences whose noise floor varies wildly: the KL ratio's interval is unbounded above."""
    recs = records(n, scale=3.0, seed=1)
    spike = comparison(np.full(TOKENS, 0.5), np.zeros(TOKENS), np.ones(TOKENS, dtype=bool), None, "identical")
    return [replace(r, noise=spike) if i == 0 else r for i, r in enumerate(recs)]


CASES = {
    "within tolerance": (records(32, scale=1.0), {}),
    "beyond tolerance": (records(32, scale=5.0), {}),
    "fp32 zero noise": (fp32(records(32, scale=1.0)), {}),
    "calibrated floor": (records(32, scale=1.0), {"calibration": calibration()}),
    "trusted reference": (records(32, scale=1.0), {"reference_check": TRUSTED}),
    "refused reference": (records(32, scale=1.0), {"reference_check": REFUSED, "calibration": calibration()}),
    "unshadowed adapter": (records(32, scale=1.0), {"unshadowed": "the reference does not hold it"}),
    "noise floor off": ([replace(r, noise=None) for r in records(16, scale=1.0)], {"noise_dtype": None}),
    "too few": (records(3, scale=1.0), {}),
    "nothing yet": ([], {"calibration": calibration()}),
    "heavy-tailed floor": (heavy_tailed(), {}),
}


def gauges(registry: CollectorRegistry) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() if family.name.startswith("shadow_verdict") for s in family.samples}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def as_once_published(report: ShadowReport, registry: CollectorRegistry) -> dict:
    """The gauges as they were set from the report's JSON, before `verdict_of`."""
    verdict = report.verdict
    bound = lambda value, sign: sign * float("inf") if value is None else value  # noqa: E731
    bounds = {name: (i.estimate, bound(i.low, -1), bound(i.high, 1))
              for name in CHECKS if (i := getattr(verdict, name)) is not None}
    ShadowMetrics(registry, "cand", "ref").verdict(
        verdict.status, bool(verdict.different), bounds, report.candidate.sequences if report.candidate else 0,
        verdict.floor.kl_scale if verdict.floor else 1.0)
    return gauges(registry)


@pytest.mark.parametrize("case", CASES)
def test_the_gauges_read_what_the_report_says(case):
    recs, options = CASES[case]
    judging = {"noise_dtype": "bfloat16", "policy": POLICY, **options}
    report = build_report(recs, model="cand", reference="ref", **judging)
    expected = as_once_published(report, CollectorRegistry())

    registry = CollectorRegistry()
    judgement = verdict_of(recs, **judging)
    publish(ShadowMetrics(registry, "cand", "ref"), judgement, len(recs))
    assert same(gauges(registry), expected), case
    reasons = judgement.verdict.reasons
    assert judgement.verdict.status == report.verdict.status and report.verdict.reasons[:len(reasons)] == reasons


def test_the_cases_cover_what_the_gauges_can_say():
    statuses, scales, unbounded = set(), set(), False
    for recs, options in CASES.values():
        judgement = verdict_of(recs, **{"noise_dtype": "bfloat16", "policy": POLICY, **options})
        statuses.add(judgement.verdict.status)
        scales.add(judgement.kl_scale)
        unbounded |= any(math.isinf(v) for bound in gauge_bounds(judgement.verdict).values() for v in bound)
    assert statuses == {"pass", "fail", "inconclusive"}
    assert scales == {1.0, calibration().kl_ratio}
    assert unbounded


def test_a_bound_the_data_cannot_set_reads_infinite_as_its_json_did():
    verdict = Verdict("inconclusive", [], kl_ratio=Interval(3.0, 0.5, math.inf),
                      excess_top1=Interval(0.0, -math.inf, math.nan), excess_hard=None)
    bounds = gauge_bounds(verdict)
    for name in ("kl_ratio", "excess_top1"):
        body = _interval(getattr(verdict, name))
        assert bounds[name] == (body.estimate, -math.inf if body.low is None else body.low,
                                math.inf if body.high is None else body.high)
    assert "excess_hard" not in bounds


def test_the_path_publishes_its_lanes_verdict_with_its_own_floor_and_check():
    scorer = EchoScorer()
    scorer.enable_noise_floor("bfloat16")
    for check in (TRUSTED, REFUSED):
        registry = CollectorRegistry()

        async def self_check(check=check):
            return check

        path = ShadowPath(ShadowSettings(), scorer, ShadowMetrics(registry, "cand", "ref"), calibration=calibration(),
                          self_check=self_check)
        asyncio.run(path.run_reference_check(retry=False))
        for record in records(32, scale=5.0):
            path.history.add(record)
        path.publish_verdict()
        assert same(gauges(registry), as_once_published(path.report(), CollectorRegistry()))
        assert registry.get_sample_value("shadow_verdict_state", {"model": "cand", "reference": "ref", "adapter": ""}) \
            == (-1 if check.trusted else 0)
