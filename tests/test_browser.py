"""End to end in a real browser: the service on 127.0.0.1, headless Chromium uploads an X-ray through the page."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import chest_like, make_checkpoint
from PIL import Image

from cxrdx.findings import FINDINGS
from cxrdx.predict import Predictor
from cxrdx.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path("/tmp/cxrdx_page.png")
SAMPLE = "00000013_004.png"  # Effusion, Emphysema, Infiltration, Pneumothorax
TIMEOUT_MS = 90_000  # generous: the CI machine is shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


API_KEY = "browser-test-key"


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_checkpoint(make_checkpoint(tmp_path_factory.mktemp("browser") / "best.pt", size=128), device="cpu")


@contextmanager
def serving(app) -> Iterator[str]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def service(predictor: Predictor) -> Iterator[str]:
    with serving(create_app(predictor)) as url:
        yield url


@pytest.fixture
def chromium():
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (make browser / apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def xray(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A real ChestX-ray14 image when ../shared is there, else a synthetic stand-in."""
    try:
        return request.getfixturevalue("nih_sample") / "images" / SAMPLE
    except pytest.skip.Exception:
        path = tmp_path / "synthetic.png"
        Image.fromarray(chest_like(512)).save(path)
        return path


def test_page_uploads_an_xray_shows_bars_and_a_heatmap(service: str, xray: Path, chromium) -> None:
    page = chromium.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(service)
    page.wait_for_function("document.getElementById('model').textContent.startsWith('Model')")
    banner = page.locator("#not-clinical")  # the model card: no external validation
    assert banner.is_visible() and banner.get_attribute("role") == "alert"
    assert banner.inner_text().startswith("Not for clinical use: ") and "no external validation" in banner.inner_text()
    assert page.locator("#intended-use").inner_text().startswith("Intended use: Research on")

    page.set_input_files("#file", str(xray))
    bars = page.locator("#bars button.bar")
    bars.nth(len(FINDINGS) - 1).wait_for()
    assert bars.count() == len(FINDINGS)
    labels = [bars.nth(i).get_attribute("aria-label") for i in range(len(FINDINGS))]
    assert [label.split(":")[0] for label in labels] == [f.replace("_", " ") for f in FINDINGS]
    assert all("probability" in label and "threshold" in label for label in labels)
    assert page.locator("#bars .threshold").count() == len(FINDINGS)
    page.wait_for_function("document.getElementById('xray').naturalWidth > 0")

    effusion = bars.nth(FINDINGS.index("Effusion"))
    effusion.focus()  # keyboard only: focus the bar and press Enter
    page.keyboard.press("Enter")
    page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")
    assert page.locator("#heatmap-figure").is_visible()
    assert "Effusion" in page.locator("#heatmap").get_attribute("alt")
    assert effusion.get_attribute("aria-pressed") == "true"
    assert "Heatmap of Effusion" in page.locator("#status").inner_text()
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000


def test_page_asks_for_the_api_key_and_sends_it(predictor: Predictor, xray: Path, chromium) -> None:
    with serving(create_app(predictor, api_key=API_KEY)) as url:
        page = chromium.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.locator("#key-form").wait_for()  # /v1/model answered 401: the page asks for the key
        page.fill("#api-key", "wrong key")
        page.press("#api-key", "Enter")
        page.locator("#key-form").wait_for()  # asked again
        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Enter")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('Model')")
        assert page.locator("#key-form").is_hidden()
        page.set_input_files("#file", str(xray))
        page.locator("#bars button.bar").nth(len(FINDINGS) - 1).wait_for()
        assert page.evaluate("sessionStorage.getItem('cxrdx-api-key')") == API_KEY


def test_page_shows_the_input_guards_reason_instead_of_bars(predictor: Predictor, xray: Path, chromium, tmp_path: Path) -> None:
    import dataclasses

    import numpy as np
    import torch

    from cxrdx.ood import OodGuard, logits_and_features

    # a guard centred on this very x-ray, with a tight threshold: the x-ray passes, noise is refused
    with torch.no_grad():
        features = logits_and_features(predictor.model, predictor.to_tensor(predictor.load(xray)[None]))[1][0].double().numpy()
    dim = len(features)
    guard = OodGuard(
        features,
        np.eye(dim),
        np.eye(dim),
        threshold=1e-4 * (1 + np.linalg.norm(features)),
        percentile=99.0,
        val_acceptance=0.99,
        train_images=1,
        val_images=1,
        shrinkage=0.0,
    )
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)).save(noise)
    guarded = Predictor(dataclasses.replace(predictor.checkpoint, guard=guard), device="cpu")
    with serving(create_app(guarded)) as url:
        page = chromium.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.startsWith('Model')")
        page.set_input_files("#file", str(xray))
        page.locator("#bars button.bar").nth(len(FINDINGS) - 1).wait_for()
        page.set_input_files("#file", str(noise))  # after bars, a refusal: the bars must go
        page.wait_for_function("document.getElementById('status').textContent.includes('HTTP 422')")
        assert page.locator("#bars button.bar").count() == 0
        assert page.locator("#findings-help").inner_text().startswith("No findings for this image: refused by the input guard")
        assert page.locator("#legend").is_hidden() and page.locator("#image-figure").is_hidden()
