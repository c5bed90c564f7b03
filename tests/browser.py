"""Open an HTML report in a real headless browser (Debian's chromium, installed by
`make test`): a screenshot and the console messages it logged."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def screenshot(page: Path | str, shot: Path, size: str = "1400,2200") -> list[str]:
    """Screenshot `page` (a file, or a URL) into `shot` (asserted to be a real image); returns console lines."""
    browser = shutil.which("chromium")
    assert browser, "chromium not found: `make test` installs Debian's chromium package"
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--window-size={size}", f"--screenshot={shot}", page.as_uri() if isinstance(page, Path) else page],
        capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000, run.stderr[-2000:]
    return [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
