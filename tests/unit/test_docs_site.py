"""The docs site builds with warnings as errors, and its pages render in a real headless
browser: the verdict page (what a person reads first about a rollout's gate) and the
generated command-line reference (its tables, with pipes inside code spans intact)."""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import sys
import threading
from pathlib import Path

from tests.browser import screenshot

ROOT = Path(__file__).resolve().parents[2]


def test_the_site_builds_strict_and_its_pages_render(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env={"NO_MKDOCS_2_WARNING": "1",
                           "PATH": "/usr/bin:/bin"})
    assert build.returncode == 0, build.stderr[-3000:]
    verdict = site / "verdict" / "index.html"
    html = verdict.read_text()
    assert "The noise floor" in html and 'class="md-nav' in html
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert len(re.findall(r"<table>", cli)) >= 10
    assert "<code>X-Shadow: always|never</code>" in cli and "&amp;#124;" not in cli
    # Over HTTP, as a reader gets it (the theme's scripts refuse file:// pages).
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        for page in ("verdict/", "reference/cli/"):
            errors = screenshot(f"{base}/{page}", tmp_path / f"{page.strip('/').replace('/', '-')}.png")
            assert not [line for line in errors if "Uncaught" in line or "Error" in line], errors
        server.shutdown()
