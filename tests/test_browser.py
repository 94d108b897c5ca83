"""The page in a real headless Chromium (Debian's, driven by playwright): upload, labels, heatmaps, class evidence,
and text from a model or a folder name shown as text, never as HTML."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import HOSTILE_FOLDER, HOSTILE_LABELS, ROOT
from PIL import Image

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
EXAMPLE = ROOT / "examples" / "circle.png"
# Elements the hostile labels and folder name would create if they were rendered as HTML, and their script's mark.
INJECTED = "document.querySelectorAll('.evil').length + (window.__pwned ? 100 : 0)"
LOADED_OVERLAYS = "[...document.querySelectorAll('#overlays img')].filter(i => i.complete && i.naturalWidth > 0).length"


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
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(app_url)
    page.wait_for_selector("input[type=file]", state="attached", timeout=60_000)
    yield page
    page.close()


def upload(page, path: Path = EXAMPLE) -> None:
    """Upload ``path`` and wait until the five overlays have loaded."""
    page.locator("input[type=file]").first.set_input_files(str(path))
    page.wait_for_function(f"{LOADED_OVERLAYS} >= 5", timeout=60_000)


def load_typed(page, source: str) -> None:
    """Open the model panel, type ``source`` and press Load."""
    page.get_by_text("Model", exact=True).first.click()
    page.get_by_label("Hub repo id (owner/name) or local export directory").fill(source)
    page.get_by_role("button", name="Load", exact=True).click()


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


def test_a_new_image_clears_the_previous_maps_before_its_own_arrive(page, tmp_path):
    upload(page)
    page.evaluate("""() => {
        window.__cleared = false;
        new MutationObserver(() => {
            if (document.querySelectorAll('#overlays img').length === 0) window.__cleared = true;
        }).observe(document.querySelector('#overlays'), {childList: true, subtree: true});
    }""")
    other = tmp_path / "square.png"
    Image.new("RGB", (64, 48), (30, 160, 90)).save(other)
    page.locator("input[type=file]").first.set_input_files(str(other))
    page.wait_for_function("window.__cleared", timeout=30_000)
    page.wait_for_function(f"{LOADED_OVERLAYS} >= 5", timeout=60_000)


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


def test_labels_and_folder_names_from_a_model_show_as_text(page, hostile_export):
    load_typed(page, str(hostile_export))
    page.wait_for_function("document.querySelector('#model-info').innerText.includes('bold')", timeout=60_000)
    upload(page)
    page.wait_for_function("document.querySelector('#labels').innerText.includes('%')", timeout=60_000)
    page.locator("#target input").click()
    page.wait_for_selector("[role=option]", timeout=10_000)
    info, labels = page.inner_text("#model-info"), page.inner_text("#labels")
    options = page.locator("[role=option]").all_inner_texts()
    assert page.evaluate(INJECTED) == 0
    assert HOSTILE_FOLDER in info and all(label in info for label in HOSTILE_LABELS)
    assert all(label in labels for label in HOSTILE_LABELS) and set(HOSTILE_LABELS) <= set(options)


def test_error_pop_up_shows_a_folder_name_as_text(page, tmp_path):
    folder = tmp_path / HOSTILE_FOLDER
    folder.mkdir()
    load_typed(page, str(folder))
    toast = page.get_by_test_id("toast-body")
    toast.wait_for(timeout=30_000)
    assert f"{HOSTILE_FOLDER}: no config.json" in toast.inner_text()
    assert page.evaluate(INJECTED) == 0
