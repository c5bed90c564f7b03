"""What the self-contained HTML reports (verify's and diagnose's) share: the base style
and matplotlib figures as inline SVG — no scripts, no external files, and stable element
ids (the same run gives the same page)."""

from __future__ import annotations

import io
from collections.abc import Callable


def svg_figure(draw: Callable, title: str, figsize: tuple[float, float] = (6.4, 3.8), **legend) -> str:
    """`draw(ax)` plots; the title, a light grid and the legend (`legend`: its keyword
    arguments) are added here. Returns `<figure><svg …></figure>`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "shadowserve"
    fig, ax = plt.subplots(figsize=figsize)
    try:
        draw(ax)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(**legend)
        fig.tight_layout()
        out = io.StringIO()
        fig.savefig(out, format="svg", metadata={"Date": None})  # the same page for the same data
    finally:
        plt.close(fig)
    svg = out.getvalue()
    return f"<figure>{svg[svg.index('<svg'):]}</figure>"


BASE_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
.header { font-family: monospace; color: #555; }
.badge { display: inline-block; color: white; padding: 0.3em 0.8em; border-radius: 4px; font-weight: bold; }
table { border-collapse: collapse; font-family: monospace; margin: 1em 0; }
figure { margin: 0; }
figure svg { width: 100%; height: auto; }
"""
