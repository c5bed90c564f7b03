"""diagnose's report as text (findings first, then each pass's table) and as one
self-contained HTML page (inline SVG: the per-layer error against the envelope)."""

from __future__ import annotations

import html

from adapters.diagnose.activations import DEPARTURE, SITE_NAMES, SITES
from adapters.diagnose.findings import tensor_groups
from adapters.diagnose.run import DiagnoseReport
from adapters.html_page import BASE_CSS, svg_figure

MAX_TENSOR_ROWS = 40


def title(report: DiagnoseReport) -> str:
    adapter = f" + adapter {report.adapter}" if report.adapter else ""
    return (f"{report.candidate} vs {report.reference}{adapter} — mapping {report.mapping}; "
            f"passes: {', '.join(report.passes)}")


def outcome(report: DiagnoseReport) -> str:
    if report.departs:
        return f"DEPARTS: {len(report.findings)} finding{'s' if len(report.findings) != 1 else ''} (exit 1)"
    return "nothing departs beyond dtype rounding and the noise envelope (exit 0)"


def config_rows(report: DiagnoseReport) -> list[tuple[str, str, str, str]]:
    return [(d.field + ("" if d.forward else " (info)"), str(d.candidate), str(d.reference), d.consequence)
            for d in report.config or []]


def tensor_rows(report: DiagnoseReport) -> list[tuple[str, str, str]]:
    return tensor_groups(report.weights or [], report.facts)


def layer_rows(report: DiagnoseReport) -> list[tuple[str, ...]]:
    """Per layer: candidate error / envelope at each site."""
    acts = report.activations
    rows: dict = {}
    for s in acts.sites:
        label = "embedding" if s.layer is None else str(s.layer)
        rows.setdefault(label, {})[s.site] = f"{s.ratio:.2f}×"
    return [(label, cells.get("embedding", ""), "", "", "") if label == "embedding"
            else (label, *(cells.get(site, "") for site in SITES)) for label, cells in rows.items()]


def render_text(report: DiagnoseReport) -> str:
    lines = [f"shadowserve diagnose: {title(report)}", "", outcome(report)]
    if report.findings:
        lines += ["", "Findings, most likely cause first:"]
        lines += [f"  {i}. [{f.source}] {f.summary}" for i, f in enumerate(report.findings, 1)]
    if report.config is not None:
        lines += ["", f"Config, tokenizer and template: {len([d for d in report.config if d.forward])} difference(s) "
                      "that change what the model does or sees"]
        lines += [f"  {field}: candidate {c} vs reference {r} — {why}" for field, c, r, why in config_rows(report)]
    if report.weights is not None:
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(report.weight_counts.items(), key=lambda kv: -kv[1]))
        lines += ["", f"Weights: {len(report.weights)} reference tensors: {counts}"]
        rows = tensor_rows(report)
        lines += [f"  {where}: {kind}: {detail}" for where, kind, detail in rows[:MAX_TENSOR_ROWS]]
        if len(rows) > MAX_TENSOR_ROWS:
            lines.append(f"  … {len(rows) - MAX_TENSOR_ROWS} more rows (--json lists every tensor)")
    if report.activations is not None:
        a = report.activations
        lines += ["", f"Activations: {a.prompts} prompts, {a.tokens} tokens; reference: {a.reference_loaded_as}; "
                      f"candidate: {a.candidate_loaded_as}; envelope: the reference in {a.serving_dtype}",
                  f"  logits: max |Δlogit| {a.logits.max_abs_logit_diff:.3g} (envelope {a.logits.envelope_max_abs_logit_diff:.3g}), "
                  f"mean KL {a.logits.kl_mean:.3g} nats (envelope {a.logits.envelope_kl_mean:.3g})",
                  "  candidate error / envelope per layer:",
                  "  " + _row(("layer", *(SITE_NAMES[s].split(" (")[0] for s in SITES)))]
        lines += ["  " + _row(row) for row in layer_rows(report)]
    if report.seconds:
        lines += ["", "wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())]
    return "\n".join(lines)


def _row(cells) -> str:
    return " | ".join([f"{cells[0]:>9}", *(f"{c:>21}" for c in cells[1:])]).rstrip()


def render_html(report: DiagnoseReport) -> str:
    colour = "#c0392b" if report.departs else "#1e8449"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>shadowserve diagnose</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>shadowserve diagnose</h1><p class=header>{html.escape(title(report))}</p>",
        f'<p class=badge style="background:{colour}">{html.escape(outcome(report))}</p>',
    ]
    if report.findings:
        parts.append("<h2>Findings</h2><ol>" + "".join(
            f"<li><b>{html.escape(f.source)}</b>: {html.escape(f.summary)}</li>" for f in report.findings) + "</ol>")
    if report.activations is not None:
        a = report.activations
        parts.append("<h2>Activations</h2>")
        parts.append(f"<p>{a.prompts} prompts, {a.tokens} tokens. Reference: {html.escape(a.reference_loaded_as)}; "
                     f"candidate: {html.escape(a.candidate_loaded_as)}. Envelope: the reference in {a.serving_dtype}. "
                     f"Logits: max |Δlogit| {a.logits.max_abs_logit_diff:.3g} (envelope "
                     f"{a.logits.envelope_max_abs_logit_diff:.3g}), mean KL {a.logits.kl_mean:.3g} nats (envelope "
                     f"{a.logits.envelope_kl_mean:.3g}).</p>")
        parts.append(_plot(report))
        parts.append("<p>Candidate error ÷ envelope, per layer and site (above "
                     f"{DEPARTURE:g}×: departed):</p>")
        parts.append(_table(("layer", *(SITE_NAMES[s] for s in SITES)), layer_rows(report), numbers=True))
    if report.config is not None:
        parts.append("<h2>Config, tokenizer and template</h2>")
        parts.append(_table(("field", "candidate", "reference", "consequence"), config_rows(report))
                     if report.config else "<p>No differences in the fields that change what the model does or sees.</p>")
    if report.weights is not None:
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(report.weight_counts.items(), key=lambda kv: -kv[1]))
        parts.append(f"<h2>Weights</h2><p>{len(report.weights)} reference tensors: {html.escape(counts)}</p>")
        rows = tensor_rows(report)
        if rows:
            parts.append(_table(("tensors", "kind", "detail"), rows))
    parts.append("</body></html>")
    return "\n".join(parts)


def _table(head, rows, numbers: bool = False) -> str:
    heading = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{' class=numbers' if numbers else ''}><tr>{heading}</tr>{body}</table>"


def _plot(report: DiagnoseReport) -> str:
    a = report.activations

    def draw(ax) -> None:
        for site, colour in zip(("attention", "mlp", "residual"), ("#c0392b", "#7d3c98", "#2471a3")):
            points = [(s.layer, s.candidate, s.envelope) for s in a.sites if s.site == site]
            if not points:
                continue
            layers, cand, env = zip(*points)
            ax.plot(layers, [max(v, 1e-12) for v in cand], color=colour, marker="o", markersize=3,
                    label=f"candidate: {SITE_NAMES[site]}")
            ax.plot(layers, [max(v, 1e-12) for v in env], color=colour, linestyle="--", linewidth=1,
                    label=f"{a.serving_dtype} envelope: {SITE_NAMES[site]}")
        if a.first_departure is not None and a.first_departure.layer is not None:
            ax.axvline(a.first_departure.layer, color="#555", linestyle=":", label="first departure")
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("relative L2 error vs the fp32 reference")

    return svg_figure(draw, "Per-layer error against the noise envelope", (9, 5.2),
                      fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))


_CSS = BASE_CSS + """
th, td { padding: 0.15em 0.8em; text-align: left; border-bottom: 1px solid #eee; }
table.numbers td { text-align: right; }
figure { max-width: 1000px; }
"""
