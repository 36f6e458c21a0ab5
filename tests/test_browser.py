"""The page in a real browser: Debian's chromium driven by Playwright (no browser download).

Uploads an X-ray (a real one from the shared data set when present), presses Analyse, waits for
the decision, the probabilities and the Grad-CAM overlay, and saves a screenshot to
``artifacts/browser/app.png``. CI installs chromium with ``.ci/install-chromium.sh``.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, SHARED_DATA, make_checkpoint, make_image_folder

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (see .ci/install-chromium.sh)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_xray(tmp: Path) -> Path:
    real = SHARED_DATA / "train" / "PNEUMONIA"
    if real.is_dir():
        found = sorted(p for p in real.iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        if found:
            return found[0]
    folder = make_image_folder(tmp / "synthetic", {"PNEUMONIA": 1}, size=256)
    return next((folder / "PNEUMONIA").iterdir())


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    if not os.environ.get("GRADIO_TEMP_DIR"):  # one cache folder per test session (see test_webapp)
        os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.getbasetemp() / "gradio-temp")
    Path(os.environ["GRADIO_TEMP_DIR"]).mkdir(parents=True, exist_ok=True)
    from deepcovid.webapp import build_demo, launch_kwargs

    root = tmp_path_factory.mktemp("browser")
    run = root / "checkpoints" / "tiny-run"
    make_checkpoint(run, clahe=2.0)  # a model that equalises contrast: the page must say so
    import json

    from deepcovid.metrics import binary_metrics, bootstrap_ci
    from deepcovid.plots import plot_roc

    y, p = [0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    plot_roc(y, p, run / "roc_val.png")
    (run / "test_metrics.json").write_text(json.dumps({**binary_metrics(y, p), "n": 6, "ci95": bootstrap_ci(y, p)}))
    examples = make_image_folder(root / "examples", {"PNEUMONIA": 2}, size=128)
    demo = build_demo(checkpoints_dir=root / "checkpoints", examples_dir=examples / "PNEUMONIA")
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, **launch_kwargs())
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", root=root, run=run)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, app):
    """A fresh page that records every URL the browser asks for."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    pg.requested = []
    pg.on("request", lambda r: pg.requested.append(r.url))
    try:
        yield pg
    finally:
        context.close()


def assert_no_third_party_requests(page, app):
    """Privacy: the page loads nothing from anywhere but the app itself (no fonts, CDNs, analytics)."""
    foreign = [u for u in page.requested if not u.startswith(app.url) and not u.startswith(("data:", "blob:"))]
    assert not foreign, foreign[:5]


def test_upload_analyse_and_screenshot(app, page, tmp_path):
    from deepcovid.inference import Predictor

    xray = pick_xray(tmp_path)
    expected = Predictor.from_checkpoint(app.run).predict(xray)

    page.goto(app.url)
    page.get_by_text("Research use only — not a medical device.").first.wait_for()
    page.locator("#dc-upload input[type=file]").set_input_files(str(xray))
    page.locator("#dc-preview img").first.wait_for(state="visible")  # decoded on the server, shown back
    page.locator("#dc-preview-info").get_by_text("this model equalises contrast (CLAHE, clip 2.0)").wait_for()
    page.locator("#dc-acts input[type=checkbox]").check()
    page.locator("#dc-model-card").get_by_text("Model card").click()
    page.locator("#dc-model-card").get_by_text("Validation metrics").wait_for()
    page.locator("#dc-model-card").get_by_text("Held-out test images").wait_for()  # with 95 % intervals
    # In a narrow window the card's labels ("Architecture", "Decision threshold", ...) and every
    # table heading ("specificity", ...) each read on one line, not broken mid-word (a wide
    # table scrolls instead): the distinct line tops of each cell's text.
    page.set_viewport_size({"width": 900, "height": 1000})  # a laptop window beside another
    lines_js = ("cells => cells.map(c => { const r = document.createRange(); r.selectNodeContents(c);"
                " return [c.innerText, new Set([...r.getClientRects()].map(x => Math.round(x.top))).size]; })")
    label_lines = page.locator("#dc-model-card table").first.locator("tr > :first-child").evaluate_all(lines_js)
    heading_lines = page.locator("#dc-model-card th").evaluate_all(lines_js)
    assert len(label_lines) >= 5 and len(heading_lines) >= 12, (label_lines, heading_lines)
    assert all(n == 1 for _, n in label_lines + heading_lines), (label_lines, heading_lines)
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.locator("#dc-run").click()

    decision = page.locator("#dc-decision")
    decision.get_by_text("Model output:").wait_for()
    text = decision.inner_text()
    assert f"Model output: {expected.label}" in text
    assert f"threshold {expected.threshold:.2f}" in text
    overlay = page.locator("#dc-overlay img").first
    overlay.wait_for(state="visible")
    assert overlay.evaluate("img => img.complete && img.naturalWidth > 0")
    label_text = page.locator("#dc-label").inner_text()
    assert expected.label in label_text and "%" in label_text
    page.locator("#dc-heatmap img").first.wait_for(state="visible")
    page.locator("#dc-activations img").first.wait_for(state="visible")
    assert page.locator("#dc-activations img").count() >= 1
    label_box = page.locator("#dc-activations label").first.bounding_box()
    grid_box = page.locator("#dc-activations img").first.bounding_box()
    assert grid_box["y"] >= label_box["y"] + label_box["height"], (label_box, grid_box)  # its title bar shows
    assert page.locator("#dc-model-card img").count() >= 1  # the run's ROC plot

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    shutil.copy(shot, tmp_path / "app.png")
    assert_no_third_party_requests(page, app)


def test_bad_upload_shows_an_error_and_the_page_keeps_working(app, page, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50)
    page.goto(app.url)
    page.locator("#dc-upload input[type=file]").set_input_files(str(bad))
    toast = page.locator("[data-testid=toast-body]").filter(has_text="cannot read broken.png").first
    toast.wait_for(state="visible")  # the loader's own message, in an error toast
    page.wait_for_timeout(600)  # let the toast finish sliding in
    page.screenshot(path=str(ARTIFACTS / "error.png"), full_page=False)

    page.locator("#dc-upload").get_by_role("button", name="Clear").click()
    good = make_image_folder(tmp_path / "ok", {"NORMAL": 1}, size=96)
    page.locator("#dc-upload input[type=file]").set_input_files(str(next((good / "NORMAL").iterdir())))
    page.locator("#dc-preview img").first.wait_for(state="visible")
    page.locator("#dc-run").click()
    page.locator("#dc-decision").get_by_text("Model output:").wait_for()
    assert_no_third_party_requests(page, app)
