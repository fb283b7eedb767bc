"""The report in a real headless Chromium, driven by Playwright: every figure draws, no console errors.

Chromium is Debian's package (installed here by apt-get if missing); Playwright only drives it through
`executable_path`, so no browser is ever downloaded. The page is opened from a `file://` URL and any
request to another scheme is recorded, so the test also proves the report works offline.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from evomerge.report.html import write_report

sync_api = pytest.importorskip("playwright.sync_api", reason="the `test` extra installs playwright")

# Playwright adds its own headless flag; these keep Chromium from reaching out to the network.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}
TIMEOUT_MS = 20_000

# Per figure div: how many traces plotly was given, and what it drew for them in its main SVG.
DRAWN = """gd => ({
  traces: gd.data.filter(t => t.visible !== false).length,
  svgs: [...gd.querySelectorAll('svg.main-svg')].filter(s => s.getBoundingClientRect().width > 0).length,
  scatter: [...gd.querySelectorAll('.scatterlayer g.trace')].filter(
      g => g.querySelector('path.point') || (g.querySelector('path.js-line')?.getAttribute('d') || '').length > 1
    ).length,
  heatmap: [...gd.querySelectorAll('.heatmaplayer g.hm image')].filter(
      i => i.getBoundingClientRect().width > 0 && (i.getAttribute('href') || '').startsWith('data:image/png')
    ).length,
  canvas: [...gd.querySelectorAll('canvas')].filter(c => c.width > 0 && c.height > 0).length,
})"""
# Snapshots of the projection figure: once before "play", then after each frame plotly redraws.
RECORD_PLAYBACK = """gd => {
  window.playback = {shots: [], done: false};
  const snap = () => window.playback.shots.push({
    label: gd.querySelector('.slider-group > text.slider-label').textContent,
    x: gd.data[0].x,
    points: [...gd.querySelector('.scatterlayer g.trace').querySelectorAll('path.point')].map(
      p => p.getAttribute('transform')),
  });
  snap();
  gd.on('plotly_afterplot', snap);
  gd.on('plotly_animated', () => { window.playback.done = true; });
}"""
# Decodes a PNG (data: URL) through a canvas: its size, the share of pixels darker than near-white, and
# how many distinct colours it holds. A blank page with a heading: ~0.03% inked, ~250 colours (text
# antialiasing); this report's screenshot: ~30% inked (plot backgrounds, heatmaps), thousands of colours.
PIXELS = """async url => {
  const image = new Image();
  image.src = url;
  await image.decode();
  const canvas = Object.assign(document.createElement('canvas'), {width: image.width, height: image.height});
  const context = canvas.getContext('2d');
  context.drawImage(image, 0, 0);
  const rgba = context.getImageData(0, 0, image.width, image.height).data;
  let inked = 0;
  const colours = new Set();
  for (let i = 0; i < rgba.length; i += 4) {
    if (rgba[i] + rgba[i + 1] + rgba[i + 2] < 3 * 245) inked++;
    colours.add((rgba[i] << 16) | (rgba[i + 1] << 8) | rgba[i + 2]);
  }
  return {width: image.width, height: image.height, inked: inked / (rgba.length / 4), colours: colours.size};
}"""


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


@pytest.fixture
def browser(chromium: str) -> Iterator[sync_api.Browser]:
    """Debian's chromium under Playwright, for one test."""
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
        yield launched
        launched.close()


def figure_ids(report) -> list[str]:
    """The figure divs of a written report, in page order (a section without data shows a note instead)."""
    return re.findall(r'<div id="(fig-[\w-]+)" class="plotly-graph-div"', report.path.read_text())


def png_pixels(browser: sync_api.Browser, png: bytes) -> dict:
    """Size, share of non-white pixels and number of distinct colours of a PNG, decoded in a blank page."""
    page = browser.new_page()
    try:
        return page.evaluate(PIXELS, "data:image/png;base64," + base64.b64encode(png).decode())
    finally:
        page.close()


def test_every_figure_renders_offline_without_console_errors(browser, lineage_runs, tmp_path):
    report = write_report(lineage_runs["run_b"], tmp_path / "report.html")
    expected = figure_ids(report)
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    remote: list[str] = []
    page.on("request", lambda request: None if request.url.startswith(("file:", "data:")) else remote.append(request.url))

    page.goto(report.path.resolve().as_uri(), wait_until="load", timeout=TIMEOUT_MS)
    try:
        page.wait_for_function(
            "n => window.Plotly && [...document.querySelectorAll('.plotly-graph-div')].filter("
            "gd => gd._fullLayout && gd.querySelector('svg.main-svg')).length === n",
            arg=len(expected), timeout=TIMEOUT_MS,
        )
    except sync_api.TimeoutError:
        pytest.fail(f"plotly did not draw all {len(expected)} figures ({expected}); page errors: {errors}")

    figures = page.locator(".plotly-graph-div")
    assert [figures.nth(i).get_attribute("id") for i in range(figures.count())] == expected
    for i, figure_id in enumerate(expected):
        drawn = figures.nth(i).evaluate(DRAWN)
        assert drawn["svgs"] >= 1, (figure_id, drawn)
        assert drawn["traces"] >= 1, (figure_id, drawn)
        # Every trace handed to plotly is on screen: SVG scatter/line or heatmap image, or WebGL canvas.
        assert drawn["scatter"] + drawn["heatmap"] + drawn["canvas"] >= drawn["traces"], (figure_id, drawn)

    # Interactivity without network: "play" steps the PCA animation through every generation in order,
    # redrawing the population's points for each frame and ending on the last generation it started from.
    projection = page.locator("#fig-projection")
    frames = projection.evaluate("gd => gd._transitionData._frames.map(f => ({name: f.name, x: f.data[0].x}))")
    assert len(frames) >= 2, frames
    projection.evaluate(RECORD_PLAYBACK)
    projection.locator("g.updatemenu-button", has_text="play").click()
    page.wait_for_function("() => window.playback.done", timeout=TIMEOUT_MS)
    start, *shown = page.evaluate("window.playback.shots")
    assert [shot["label"].rsplit(" ", 1)[-1] for shot in shown] == [frame["name"] for frame in frames]
    assert [shot["x"] for shot in shown] == [frame["x"] for frame in frames]
    for previous, shot in zip([start, *shown], shown):
        assert len(shot["points"]) == len(shot["x"]) and shot["points"] != previous["points"], shot
    assert shown[-1]["points"] == start["points"]

    screenshot = tmp_path / "report.png"
    page.screenshot(path=screenshot, full_page=True)
    height = page.evaluate("document.documentElement.scrollHeight")
    assert height > VIEWPORT["height"] * 2  # all figures stacked, not just the first screen
    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pixels = png_pixels(browser, png)
    assert (pixels["width"], pixels["height"]) == (VIEWPORT["width"], height), pixels
    assert pixels["inked"] > 0.05 and pixels["colours"] > 1000, pixels
    assert not errors, errors
    assert not remote, remote


# Bounding boxes (page pixels) of what a figure draws around its plot: legend, colour bars, animation
# slider and buttons, title. Any two of them overlapping hides one under the other.
FURNITURE = """gd => {
  const boxes = [];
  const add = (kind, element) => {
    const r = element.getBoundingClientRect();
    if (r.width > 0 && r.height > 0) boxes.push({kind, left: r.left, top: r.top, right: r.right, bottom: r.bottom});
  };
  gd.querySelectorAll('g.legend').forEach(e => add('legend', e));
  gd.querySelectorAll('g.colorbar').forEach(e => add('colorbar', e));
  gd.querySelectorAll('g.slider-container').forEach(e => add('slider', e));
  gd.querySelectorAll('g.updatemenu-container').forEach(e => add('buttons', e));
  gd.querySelectorAll('text.gtitle').forEach(e => add('title', e));
  return boxes;
}"""


def overlap(a: dict, b: dict) -> float:
    """Area (px²) two boxes share."""
    width = min(a["right"], b["right"]) - max(a["left"], b["left"])
    height = min(a["bottom"], b["bottom"]) - max(a["top"], b["top"])
    return max(width, 0) * max(height, 0)


def test_overlap_of_boxes_is_their_shared_area():
    box = {"left": 0, "top": 0, "right": 10, "bottom": 10}
    assert overlap(box, {"left": 5, "top": 5, "right": 20, "bottom": 20}) == 25
    assert overlap(box, {"left": 10, "top": 0, "right": 20, "bottom": 10}) == 0  # touching is not overlapping


@pytest.fixture(scope="module")
def pareto_run(lineage_runs, tmp_path_factory):
    """A tiny two-objective run: the Pareto figure (colour bar, legend, slider, buttons) and hypervolume."""
    import yaml

    from conftest import write_task_files
    from evomerge.pipelines import evolve

    root = tmp_path_factory.mktemp("pareto")
    rows = [{"question": f"{a}+{b}", "answer": str(a + b)} for a in range(4) for b in range(4)]
    second = write_task_files(root / "twice", rows[:8], rows[8:], name="again", generation={"max_new_tokens": 2})
    config = root / "pareto.yaml"
    config.write_text(yaml.safe_dump({
        "name": "pareto", "base_model": str(lineage_runs["base"]),
        "parents": [str(lineage_runs["one"]), str(lineage_runs["two"])], "method": "task_arithmetic",
        "genome": {"weight": {"bounds": [0, 1.5], "granularity": "per_layer"}}, "combine": "pareto",
        "objectives": [{"task": str(lineage_runs["task"])}, {"task": str(second)}],
        "budget": {"candidates": 6, "population": 2}, "optimizer": "random", "batch_size": 16,
    }))
    evolve(config, root / "run")
    return root / "run"


@pytest.mark.parametrize("run", ["run_a", "run_b", "pareto"])
def test_no_legend_colour_bar_slider_or_title_overlaps_another(browser, lineage_runs, pareto_run, run, tmp_path):
    report = write_report(pareto_run if run == "pareto" else lineage_runs[run], tmp_path / "report.html")
    assert ("hypervolume" in report.sections) == (run == "pareto")
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(report.path.resolve().as_uri(), wait_until="load", timeout=TIMEOUT_MS)
    expected = figure_ids(report)
    page.wait_for_function(
        "n => window.Plotly && [...document.querySelectorAll('.plotly-graph-div')].filter("
        "gd => gd._fullLayout && gd.querySelector('svg.main-svg')).length === n",
        arg=len(expected), timeout=TIMEOUT_MS,
    )
    checked = 0
    for section in expected:
        boxes = page.locator(f"#{section}").evaluate(FURNITURE)
        kinds = {box["kind"] for box in boxes}
        assert "title" in kinds, (section, boxes)
        for i, first in enumerate(boxes):
            for second in boxes[i + 1:]:
                assert overlap(first, second) < 1, (section, first, second)
        checked += len(boxes) >= 2
    assert checked >= len(expected) - 2, checked  # most figures have a legend or colour bar besides the title
    page.screenshot(path=tmp_path / "report.png", full_page=True)
