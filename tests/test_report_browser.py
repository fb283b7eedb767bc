"""The report in a real headless Chromium: every figure draws, no console errors, a screenshot is kept.

Chromium is Debian's package (installed here if missing); no browser is ever downloaded. The page is
loaded with `--dump-dom` after a virtual-time budget, so the DOM read back is the one plotly built.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from evomerge.report.html import write_report

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of Debian's chromium, installing the package when it is missing."""
    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get") is not None:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, timeout=900, check=False)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and `apt-get install -y chromium` was not possible here")
    return found


def run_chromium(chromium: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [chromium, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=15000", *extra, url],
        capture_output=True, text=True, timeout=180, check=False,
    )


def test_every_figure_renders_without_console_errors(chromium, lineage_runs, tmp_path):
    report = write_report(lineage_runs["run_b"], tmp_path / "report.html")
    url = report.path.resolve().as_uri()
    dom = run_chromium(chromium, url, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    figure_ids = re.findall(r'<div id="(fig-[\w-]+)"', report.path.read_text())
    assert len(figure_ids) == len(report.sections) - 2  # all but the summary and results tables
    for figure_id in figure_ids:
        start = dom.stdout.index(f'id="{figure_id}"')
        block = dom.stdout[start:start + 200_000]
        # plotly marks a drawn figure's div and fills its main SVG with traces.
        assert "js-plotly-plot" in dom.stdout[start - 300:start + 300], figure_id
        assert re.search(r"<svg[^>]*class=\"main-svg\"", block), figure_id
        assert re.search(r'class="(scatterlayer|heatmaplayer)', block) or "class=\"trace" in block, figure_id
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    errors = [line for line in console if re.search(r"error|uncaught", line, re.IGNORECASE)]
    assert not errors, errors
    screenshot = tmp_path / "report.png"
    shot = run_chromium(chromium, url, tmp_path / "profile2", f"--screenshot={screenshot}", "--window-size=1280,4000")
    assert shot.returncode == 0 and screenshot.read_bytes()[:4] == b"\x89PNG"
