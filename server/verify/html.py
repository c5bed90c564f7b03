"""verify's HTML report: one self-contained page (inline SVG plots, no scripts, no
external files): the verdict, the statistics table, and the curves people would rather
look at than read — P(diverged by position), per-position KL and the Δp histogram, each
for the candidate and the noise floor side by side."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from adapters.html_page import BASE_CSS, svg_figure
from server.verify.structure import structure_lines
from server.verify.text import describe_trajectory, difference_label, header, intro, sequence_rows, summary_rows
from shadow.history import ComparedSequence

COLOURS = {"candidate": "#c0392b", "noise floor": "#2471a3"}
STATUS_COLOURS = {"pass": "#1e8449", "fail": "#c0392b", "inconclusive": "#b9770e"}


def write_html(result, settings, path: Path) -> None:
    """`result` is a VerifyResult; `settings` the VerifySettings the run used."""
    rows = sequence_rows(result.sequences, result.labels, result.decode)
    path.write_text(render_html(result.report, result.sequences, header(settings, result.report), rows,
                                result.structure), encoding="utf-8")


def render_html(report, sequences: list[ComparedSequence], title: str, rows=(), structure=None) -> str:
    """`structure`: the StructureCheck of the config and weight passes, shown under the verdict."""
    v = report.verdict
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>shadowserve verify</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>shadowserve verify</h1><p class=header>{html.escape(title)}</p>",
        f'<p class="badge verdict" style="background:{STATUS_COLOURS[v.status]}">Verdict: {v.status.upper()}</p>',
        f'<p class="badge different">Detectably different from the noise floor: {difference_label(v)}</p>',
        "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in v.reasons) + "</ul>",
    ]
    if report.trajectory:
        parts.append(f"<p>{html.escape(describe_trajectory(report.trajectory))}</p>")
    lines = structure_lines(structure)
    if lines:
        parts.append(f"<h2>Config and weights</h2><p class=structure>{html.escape(lines[0])}</p>")
        if structure.findings:
            parts.append("<ol class=findings>" + "".join(f"<li><b>{html.escape(f.source)}</b>: {html.escape(f.summary)}</li>"
                                                         for f in structure.findings) + "</ol>")
    if report.candidate is not None:
        parts.append(f"<p>{html.escape(intro(report))}</p>")
        parts.append(_table(summary_rows(report)))
        sides = _sides(sequences)
        parts.append("<div class=plots>")
        parts += [svg_figure(lambda ax, draw=draw: draw(ax, sides), title) for title, draw in PLOTS]
        parts.append("</div>")
        if rows:
            parts.append("<h2>First divergence per sequence</h2>")
            parts.append(_table(rows, ("sequence", "candidate", "noise floor"), align="left"))
    parts.append("</body></html>")
    return "\n".join(parts)


def _sides(sequences: list[ComparedSequence]) -> dict:
    sides = {"candidate": [s.candidate for s in sequences]}
    if sequences and all(s.noise is not None for s in sequences):
        sides["noise floor"] = [s.noise for s in sequences]
    return sides


def _table(rows, head=("", "candidate", "noise floor"), align: str = "right") -> str:
    body = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(c)}</td><td>{html.escape(n)}</td></tr>" if label
        else "<tr class=gap><td colspan=3></td></tr>"
        for label, c, n in rows
    )
    heading = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<table class="{align}"><tr>{heading}</tr>{body}</table>'


def _diverged_by(ax, sides) -> None:
    longest = max(c.compared_tokens for seqs in sides.values() for c in seqs)
    positions = np.arange(longest + 1)
    for name, seqs in sides.items():
        firsts = np.array([c.first_divergence for c in seqs if c.first_divergence is not None])
        share = [(firsts <= n).sum() / len(seqs) for n in positions]
        ax.step(positions, share, where="post", label=name, color=COLOURS[name])
    ax.set_xlabel("position N (completion tokens)")
    ax.set_ylabel("P(first divergence ≤ N)")
    ax.set_ylim(0, 1)


def _per_position_kl(ax, sides) -> None:
    for name, seqs in sides.items():
        longest = max(c.compared_tokens for c in seqs)
        sums, counts = np.zeros(longest), np.zeros(longest)
        for c in seqs:
            sums[: c.compared_tokens] += c.tokens.kl
            counts[: c.compared_tokens] += 1
        mean = np.maximum(sums / np.maximum(counts, 1), 1e-12)
        ax.plot(np.arange(longest), mean, label=name, color=COLOURS[name], linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("position (completion tokens)")
    ax.set_ylabel("mean KL(ref ‖ ·), nats")


def _delta_p(ax, sides) -> None:
    bins = np.linspace(-1, 1, 81)
    for name, seqs in sides.items():
        values = np.concatenate([c.tokens.delta_p for c in seqs])
        ax.hist(values, bins=bins, histtype="step", label=name, color=COLOURS[name], linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("Δp = p(·) − p(ref) of the emitted token")
    ax.set_ylabel("tokens")


def _kl_cdf(ax, sides) -> None:
    for name, seqs in sides.items():
        values = np.sort(np.maximum(np.concatenate([c.tokens.kl for c in seqs]), 1e-12))
        ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=name, color=COLOURS[name])
    ax.set_xscale("log")
    ax.set_xlabel("token KL(ref ‖ ·), nats")
    ax.set_ylabel("share of tokens ≤ x")


PLOTS = (
    ("P(diverged by position N)", _diverged_by),
    ("Mean KL per position", _per_position_kl),
    ("Δp histogram", _delta_p),
    ("Token KL, cumulative", _kl_cdf),
)


_CSS = BASE_CSS + """
th, td { padding: 0.15em 0.8em; text-align: right; border-bottom: 1px solid #eee; }
table.left th, table.left td { text-align: left; }
th:first-child { text-align: left; }
.gap td { border: none; height: 0.6em; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 1em; }
"""
