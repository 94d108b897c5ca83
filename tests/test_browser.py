"""The page in a real headless Chromium (Debian's, driven by playwright): upload, labels, heatmaps, class evidence."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from test_app import ROOT, shared_app

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
EXAMPLE = ROOT / "examples" / "circle.png"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's Chromium with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(shared_app())
    page.wait_for_selector("input[type=file]", state="attached", timeout=60_000)
    yield page
    page.close()


def upload(page, path: Path = EXAMPLE) -> None:
    """Upload ``path`` and wait until the five overlays have loaded."""
    page.locator("input[type=file]").first.set_input_files(str(path))
    page.wait_for_function(
        "[...document.querySelectorAll('#overlays img')].filter(i => i.complete && i.naturalWidth > 0).length >= 5",
        timeout=60_000,
    )


def test_page_states_random_weights_and_class_agnostic_maps(page):
    text = page.inner_text("body")
    assert "random weights" in text and "class-agnostic" in text and "van_micro" in text


def test_upload_shows_labels_and_stage_overlays(page, tmp_path):
    upload(page)
    page.wait_for_function("document.querySelector('#labels').innerText.includes('%')", timeout=60_000)
    captions = page.locator("#overlays").inner_text()
    assert all(f"Stage {s}" in captions for s in range(1, 5)) and "Combined" in captions
    sizes = page.eval_on_selector_all("#overlays img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")
    with Image.open(EXAMPLE) as example:
        assert list(example.size) in sizes
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000


def test_picking_a_class_shows_its_evidence(page):
    upload(page)
    before = page.eval_on_selector_all("#compare img", "imgs => imgs.map(i => i.src)")
    page.locator("#target input").click()
    page.locator("#target input").fill("goldfish")
    page.get_by_role("option", name="goldfish", exact=True).click()
    page.wait_for_function(
        "before => { const s = [...document.querySelectorAll('#compare img')].map(i => i.src);"
        " return s.length > 0 && s.join() !== before.join(); }",
        arg=before, timeout=60_000,
    )
    assert "error" not in page.inner_text("body").lower()
