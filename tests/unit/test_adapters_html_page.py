"""What the HTML reports share (adapters/html_page.py): a matplotlib figure as inline SVG
in a <figure>, with its title and legend, no scripts, and stable element ids (the same
report gives the same page, but for the time matplotlib stamps in the SVG's metadata)."""

from __future__ import annotations

import re

from adapters.html_page import BASE_CSS, svg_figure


def draw(ax) -> None:
    ax.plot([0, 1, 2], [0.1, 0.4, 0.2], label="candidate")
    ax.plot([0, 1, 2], [0.1, 0.2, 0.15], label="noise floor")


def test_a_figure_is_inline_svg_with_its_title_and_legend():
    page = svg_figure(draw, "KL per position", loc="upper left")
    assert page.startswith("<figure><svg") and page.endswith("</svg>\n</figure>")
    assert "<?xml" not in page and "<script" not in page.lower()
    for text in ("KL per position", "candidate", "noise floor"):
        assert f"<!-- {text} -->" in page  # matplotlib's SVG names each text it draws


def test_the_same_figure_gives_the_same_page():
    first, second = svg_figure(draw, "same"), svg_figure(draw, "same")
    assert re.search(r'id="p[0-9a-f]{10}"', first)  # a clip path: its id is hashed with the fixed salt
    assert first == second and "<dc:date>" not in first  # no time stamp: the same page for the same data
    assert first != svg_figure(draw, "other")


def test_the_style_sizes_figures_to_the_page():
    assert "figure svg { width: 100%; height: auto; }" in BASE_CSS
