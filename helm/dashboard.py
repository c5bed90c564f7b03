"""Builds the chart's Grafana dashboard (helm/shadowserve/dashboards/shadowserve.json)
and the panel table of docs/kubernetes.md from one description, so the two never
disagree. Run `python helm/dashboard.py` after changing a panel; a test checks that the
committed files are what this script writes.

Every comparison series carries `comparison`: "candidate" (the served model vs the fp32
reference) and "noise_floor" (the reference in the serving dtype vs fp32, on the same
positions). Panels show the two side by side; the verdict panels show their ratios.

Every shadow series also carries `adapter`: the LoRA adapter a request chose, absent (empty)
for the base model. Each adapter has its own verdict, so the panels keep adapters apart
wherever they split by variant, and the `adapter` variable selects among them (its All is
`.*`, which the base model's label-less series match too). vLLM's own series (vllm:*) have
no adapter: the serving panels are not filtered by it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "shadowserve" / "dashboards" / "shadowserve.json"
DOCS = HERE.parent / "docs" / "kubernetes.md"
SEL = 'model=~"$model",variant=~"$variant",adapter=~"$adapter"'
RI = "$__rate_interval"
GROUP = "variant, adapter"  # what a shadow panel splits by (besides comparison)
BY = f"{GROUP}, comparison"
VERDICT_BY = f"model, {GROUP}"  # one verdict per (model, variant, adapter): never pooled
V = "{{variant}} {{adapter}}"  # their legend ({{adapter}} is empty for the base model)
# Whether a candidate replica reaches its reference is one fact for all its adapters (each
# adapter's shadow_reference_up carries the same value): that panel does not split by adapter.
REFERENCE_BY = "model, variant"
COMPARED = 'outcome="compared"'


def s(extra: str = "") -> str:
    return "{" + SEL + ("," + extra if extra else "") + "}"


def rate(metric: str, extra: str = "", window: str = RI) -> str:
    return f"rate({metric}{s(extra)}[{window}])"


def side(comparison: str, extra: str = "") -> str:
    return f'comparison="{comparison}"' + (f",{extra}" if extra else "")


def ratio_to_noise(metric: str) -> str:
    """candidate / noise floor of a per-(model, variant, adapter) sum: the paired ratio (both
    sides cover the same tokens, so a ratio of sums is a ratio of means)."""
    candidate = rate(metric, side("candidate"))
    noise = rate(metric, side("noise_floor"))
    return f"sum by ({VERDICT_BY}) ({candidate}) / sum by ({VERDICT_BY}) ({noise})"


def excess(metric: str, label: str, per: str) -> str:
    """(candidate - noise floor) per compared unit, by (model, variant, adapter)."""
    candidate = rate(metric, side("candidate", label))
    noise = rate(metric, side("noise_floor", label))
    total = rate(per, side("candidate"))
    return f"(sum by ({VERDICT_BY}) ({candidate}) - sum by ({VERDICT_BY}) ({noise})) / sum by ({VERDICT_BY}) ({total})"


def bound_of(statistic: str, bound: str) -> str:
    return f'statistic="{statistic}",bound="{bound}"'


def diverged_by(n: int) -> str:
    bucket = s(f'le="{n}.0"')
    return (f"sum by (comparison) (increase(shadow_first_divergence_position_tokens_bucket{bucket}[$__range]))"
            f" / sum by (comparison) (increase(shadow_compared_sequence_tokens_count{s()}[$__range]))")


def target(expr: str, legend: str, **extra) -> dict:
    return {"expr": expr, "legendFormat": legend, **extra}


def quantile(q: float, metric: str) -> str:
    return f"histogram_quantile({q}, sum by (le, {BY}) ({rate(metric + '_bucket')}))"


def by_comparison_ratio(num: str, num_extra: str, den: str) -> str:
    return f"sum by ({BY}) ({rate(num, num_extra)}) / sum by ({BY}) ({rate(den)})"


PANELS = [
    dict(
        title="Verdict (the server's): state, and the KL ratio's confidence sequence",
        description=(
            "What GET /v1/shadow/verdict says, per adapter (each has its own verdict; the base model's has no "
            "adapter label): state 1 pass, 0 undecided, -1 fail (anytime-valid: its "
            "intervals hold however often they are read, and a decision stands until the opposite is proven), "
            "'different' 1 when the candidate is detectably different from the noise floor, and the KL ratio with "
            "its bounds. The alerts and canary gates decide on the state (min over replicas); the ratio panels "
            "beside it are point estimates, for reading."),
        unit="short", w=8,
        targets=[target(f"min by ({VERDICT_BY}) (shadow_verdict_state{s()})", f"{V} state"),
                 target(f"max by ({VERDICT_BY}) (shadow_verdict_different{s()})", f"{V} different"),
                 *[target(f"max by ({VERDICT_BY}) (shadow_verdict_interval{s(bound_of('kl_ratio', b))})",
                          f"{V} KL ratio " + b) for b in ("low", "estimate", "high")]],
    ),
    dict(
        title="Verdict: token KL, candidate over noise floor",
        description=(
            "Mean token KL of the candidate divided by the noise floor's (the reference in the serving dtype vs itself in "
            "fp32, on the same positions). About 1 for precision noise; the verdict fails once the candidate's KL is "
            "proven above the limit times the noise floor's (2x by default). A point estimate, without an interval. "
            "Paired: both sides cover the same tokens."),
        unit="short", w=8,
        targets=[target(ratio_to_noise("shadow_token_kl_divergence_sum"), f"{V} KL ratio")],
    ),
    dict(
        title="Verdict: excess top-1 disagreement over the noise floor",
        description=("Top-1 disagreements per compared token, candidate minus noise floor. The verdict fails above "
                     "1 point (0.01) by default."),
        unit="percentunit", w=8,
        targets=[target(excess("shadow_tokens_total", 'top1="different"', "shadow_tokens_total"), f"{V} excess top-1")],
    ),
    dict(
        title="Verdict: excess hard divergences over the noise floor",
        description=("Hard divergences per compared sequence, candidate minus noise floor (the same near-tie margin on "
                     "both sides). The verdict fails above 10 points (0.1) by default."),
        unit="percentunit", w=8,
        targets=[target(excess("shadow_sequences_total", 'result="hard"', "shadow_sequences_total"), f"{V} excess hard")],
    ),
    dict(
        title="Hard vs near-tie divergences per compared sequence",
        description=("Share of compared sequences whose first divergence is hard (beyond the near-tie margin) or a "
                     "near-tie, for the candidate and for the noise floor. A first divergence is not an alarm by itself: "
                     "in bf16 most sequences diverge at a near-tie from precision alone."),
        unit="percentunit",
        targets=[
            target(by_comparison_ratio("shadow_sequences_total", 'result="hard"', "shadow_sequences_total"),
                   f"{V} {{{{comparison}}}} hard"),
            target(by_comparison_ratio("shadow_sequences_total", 'result="near_tie"', "shadow_sequences_total"),
                   f"{V} {{{{comparison}}}} near-tie"),
        ],
    ),
    dict(
        title="Same top-1 rate",
        description=("Share of compared positions where the top-1 agrees with the fp32 reference's (llama.cpp's "
                     "'same top p'), candidate and noise floor side by side."),
        unit="percentunit",
        targets=[target(by_comparison_ratio("shadow_tokens_total", 'top1="same"', "shadow_tokens_total"),
                        f"{V} {{{{comparison}}}}")],
    ),
    dict(
        title="First divergence position",
        description="Distribution of the candidate's first divergence position, over diverged sequences.",
        type="heatmap", unit="short",
        targets=[target(f"sum by (le) ({rate('shadow_first_divergence_position_tokens_bucket', side('candidate'))})",
                        "{{le}}", format="heatmap")],
    ),
    dict(
        title="P(diverged by position N)",
        description=("Share of compared sequences whose first divergence is at or before position N, over the "
                     "dashboard's time range: candidate and noise floor side by side."),
        type="bargauge", unit="percentunit",
        targets=[
            target(diverged_by(n), f"{{{{comparison}}}} N={n}", instant=True) for n in (1, 4, 16, 64)
        ],
    ),
    dict(
        title="Token KL(ref || ·): mean and quantiles",
        description=("Per compared token, KL over the top-k plus the rest (a lower bound of the full-vocabulary KL), "
                     "nats; candidate and noise floor. llama.cpp's --kl-divergence statistics, live."),
        unit="short", log=True,
        targets=[
            target(f"sum by ({BY}) ({rate('shadow_token_kl_divergence_sum')}) / sum by ({BY}) "
                   f"({rate('shadow_token_kl_divergence_count')})", f"{V} {{{{comparison}}}} mean"),
            *[target(quantile(q, "shadow_token_kl_divergence"), f"{V} {{{{comparison}}}} p{p}")
              for q, p in ((0.5, "50"), (0.99, "99"), (0.999, "99.9"))],
        ],
    ),
    dict(
        title="Δp of the emitted token: mean, RMS and tails",
        description="p(·) − p_ref of the emitted token (llama.cpp's Δp). A heavier negative tail means real degradation.",
        unit="percentunit",
        targets=[
            target(f"(sum by ({BY}) ({rate('shadow_token_delta_p_gain_total')}) - sum by ({BY}) "
                   f"({rate('shadow_token_delta_p_loss_total')})) / sum by ({BY}) ({rate('shadow_token_delta_p_count')})",
                   f"{V} {{{{comparison}}}} mean"),
            target(f"sqrt(sum by ({BY}) ({rate('shadow_token_delta_p_squares_total')}) / sum by ({BY}) "
                   f"({rate('shadow_token_delta_p_count')}))", f"{V} {{{{comparison}}}} RMS"),
            target(quantile(0.01, "shadow_token_delta_p"), f"{V} {{{{comparison}}}} p1"),
            target(quantile(0.99, "shadow_token_delta_p"), f"{V} {{{{comparison}}}} p99"),
        ],
    ),
    dict(
        title="Log-prob drift over the top-k",
        description="Per token, max |logprob − logprob_ref| over the top-k, nats; candidate and noise floor.",
        unit="short",
        targets=[
            target(f"sum by ({BY}) ({rate('shadow_token_logprob_drift_sum')}) / sum by ({BY}) "
                   f"({rate('shadow_token_logprob_drift_count')})", f"{V} {{{{comparison}}}} mean"),
            target(quantile(0.99, "shadow_token_logprob_drift"), f"{V} {{{{comparison}}}} p99"),
        ],
    ),
    dict(
        title="Shadow samples by outcome",
        description=("compared; dropped (queue full or shutdown); skipped (aborted, failed or empty generation); error "
                     "(the reference refused or failed the batch, NaN, or a sample that waited past "
                     "--shadow-max-sample-age-s while the reference could not answer)."),
        unit="reqps",
        targets=[target(f"sum by (outcome) ({rate('shadow_samples_total')})", "{{outcome}}")],
    ),
    dict(
        title="Shadow queue depth", description="Samples waiting for the reference.", unit="short", w=6,
        targets=[target(f"sum by ({GROUP}) (shadow_queue_depth{s()})", V)],
    ),
    dict(
        title="Shadow coverage: compared share of sampled, and the throttle",
        description=("Samples compared per request sampled, over the rate window: about 1 when the reference keeps up, "
                     "lower while it lags behind a burst or drops. 'held back' is 1 while the engine has requests (the "
                     "reference is held to its duty cap and confined threads) and 0 while it runs free on an idle "
                     "engine."),
        unit="percentunit", w=6,
        targets=[target(f"sum by ({GROUP}) ({rate('shadow_samples_total', COMPARED)}) / "
                        f"sum by ({GROUP}) ({rate('shadow_sampled_total')})", f"{V} compared / sampled"),
                 target(f"max by ({GROUP}) (shadow_reference_throttled{s()})", f"{V} held back")],
    ),
    dict(
        title="Shadow lag: sample age at comparison, oldest waiting sample",
        description=("How long after its request ended a sample is compared (p50, p99), and how long the oldest sample "
                     "still waiting has waited: the delay between traffic and the verdict that judges it."),
        unit="s", w=6,
        targets=[*[target(f"histogram_quantile({q}, sum by (le, {GROUP}) ({rate('shadow_sample_age_seconds_bucket')}))",
                          f"{V} age p{p}") for q, p in ((0.5, "50"), (0.99, "99"))],
                 target(f"max by ({GROUP}) (shadow_queue_oldest_age_seconds{s()})", f"{V} oldest waiting")],
    ),
    dict(
        title="Reference latency per batch",
        description="Teacher-forced scoring time of one reference batch (fp32 pass, plus the noise-floor pass).",
        unit="s", w=6,
        targets=[target(f"histogram_quantile({q}, sum by (le) ({rate('shadow_reference_seconds_bucket')}))", f"p{p}")
                 for q, p in ((0.5, "50"), (0.99, "99"))],
    ),
    dict(
        title="Reference up (min over replicas)",
        description=("1 while the candidates reach their reference, 0 while a replica does not (connections refused, "
                     "its probe unanswered, a proxy's 502-504: a reference pod restarting or loading its model); the "
                     "lowest of a variant's replicas. A slow or busy reference reads 1 (see the retries). "
                     "One line per variant, not per adapter: the reference answers for all of them. While it is 0, "
                     "sampled requests wait in the queue and are retried (the queue and lag panels grow); they count "
                     "as errors only past --shadow-max-sample-age-s. ShadowReferenceDown fires when it stays 0."),
        unit="short", w=6,
        targets=[target(f"min by ({REFERENCE_BY}) (shadow_reference_up{s()})", "{{model}} {{variant}}")],
    ),
    dict(
        title="Reference retries",
        description=("Reference calls tried again, per second, because the reference could not answer (unreachable, "
                     "timed out, 429, 502-504, busy): their samples stay queued until --shadow-max-sample-age-s. 0 "
                     "while the reference keeps up."),
        unit="ops", w=6,
        targets=[target(f"sum by ({GROUP}) ({rate('shadow_reference_retries_total')})", f"{V} retries")],
    ),
    dict(
        title="Serving throughput (vLLM)",
        description="Finished requests and generated tokens per second, from vLLM's own metrics, per variant "
                    "(the ServiceMonitor gives vLLM's series the release's variant).",
        unit="short",
        targets=[
            target(f'sum by (variant) (rate(vllm:request_success_total{{model_name=~"$model",variant=~"$variant"}}[{RI}]))',
                   "{{variant}} requests/s"),
            target(f'sum by (variant) (rate(vllm:generation_tokens_total{{model_name=~"$model",variant=~"$variant"}}[{RI}]))',
                   "{{variant}} output tokens/s"),
        ],
    ),
    dict(
        title="Serving latency (vLLM)",
        description="Time to first token and end-to-end request latency quantiles, from vLLM's own metrics, "
                    "per variant.",
        unit="s",
        targets=[
            target(f'histogram_quantile({q}, sum by (le, variant) '
                   f'(rate(vllm:{metric}_bucket{{model_name=~"$model",variant=~"$variant"}}[{RI}])))',
                   f"{{{{variant}}}} {name} p{p}")
            for metric, name in (("time_to_first_token_seconds", "TTFT"), ("e2e_request_latency_seconds", "e2e"))
            for q, p in ((0.5, "50"), (0.99, "99"))
        ],
    ),
]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def variable(name: str, label: str, query: str) -> dict:
    return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
            "query": {"query": query, "refId": name}, "definition": query, "includeAll": True, "multi": True,
            "allValue": ".*", "refresh": 2, "current": {"text": "All", "value": "$__all"}}


def dashboard() -> dict:
    panels, x, y, row_h = [], 0, 0, 8
    for number, spec in enumerate(PANELS, start=1):
        w = spec.get("w", 12)
        if x + w > 24:
            x, y = 0, y + row_h
        field = {"defaults": {"unit": spec["unit"]}, "overrides": []}
        if spec.get("log"):
            field["defaults"]["custom"] = {"scaleDistribution": {"type": "log", "log": 10}}
        panels.append({
            "id": number, "type": spec.get("type", "timeseries"), "title": spec["title"],
            "description": spec["description"], "datasource": DATASOURCE,
            "gridPos": {"x": x, "y": y, "w": w, "h": row_h},
            "targets": [{"refId": chr(ord("A") + i), **t} for i, t in enumerate(spec["targets"])],
            "fieldConfig": field, "options": {},
        })
        x += w
    return {
        "uid": "shadowserve-drift", "title": "shadowserve: candidate vs reference drift", "schemaVersion": 39,
        "version": 2, "tags": ["shadowserve", "vllm"], "time": {"from": "now-6h", "to": "now"}, "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
            variable("model", "Model", "label_values(shadow_samples_total, model)"),
            variable("variant", "Variant", 'label_values(shadow_samples_total{model=~"$model"}, variant)'),
            # The base model's series have no adapter label: only All (.*) includes them.
            variable("adapter", "Adapter",
                     'label_values(shadow_samples_total{model=~"$model",variant=~"$variant"}, adapter)'),
        ]},
        "panels": panels,
    }


def docs_table(board: dict) -> str:
    rows = ["| panel | PromQL |", "|---|---|"]
    for panel in board["panels"]:
        queries = "<br>".join(f"`{t['legendFormat']}`: `{t['expr']}`" for t in panel["targets"])
        cell = f"**{panel['title']}** — {panel['description']}"
        rows.append(f"| {cell.replace('|', '&#124;')} | {queries.replace('|', '&#124;')} |")
    return "\n".join(rows)


BEGIN, END = "<!-- panels: generated by helm/dashboard.py -->", "<!-- end of panels -->"


def render_docs(text: str, board: dict) -> str:
    block = f"{BEGIN}\n{docs_table(board)}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOCS}: no '{BEGIN}' … '{END}' block to fill")
    return pattern.sub(lambda _: block, text)


def main() -> None:
    board = dashboard()
    DASHBOARD.write_text(json.dumps(board, indent=1, ensure_ascii=False) + "\n")
    DOCS.write_text(render_docs(DOCS.read_text(), board))


if __name__ == "__main__":
    main()
