"""The search page in real headless Chromium, against the Procfile's processes with the sample
products of ``tests/test_end_to_end.py`` indexed (this module runs after it, so its publish of
the same products finds them stored instead of making the indexer embed them again mid-module).

It drives Debian's ``chromium`` (``/usr/bin/chromium``, or ``LOOKALIKE_CHROMIUM``) with
Playwright and never downloads a browser. Without Chromium it fails, saying how to get it (CI's
``.ci/run`` installs it); ``LOOKALIKE_SKIP_BROWSER=1`` skips it on a machine without one.
Screenshots go to ``test-artifacts/page-*.png``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SAMPLE
from tests.test_end_to_end import indexed, system  # noqa: F401 (fixtures: sample products, searchable)

CHROMIUM = os.environ.get("LOOKALIKE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"
QUERY = SAMPLE / "queries" / "17423.jpg"  # a watch, not in the catalog
GRID_LOADED = """k => {
    const images = [...document.querySelectorAll('#grid img')];
    return images.length === k && images.every(img => img.complete && img.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium under Playwright."""
    if os.environ.get("LOOKALIKE_SKIP_BROWSER") == "1":
        pytest.skip("LOOKALIKE_SKIP_BROWSER=1")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (.ci/run does), point "
                    "LOOKALIKE_CHROMIUM at another, or set LOOKALIKE_SKIP_BROWSER=1 to skip the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"page-{name}.png", full_page=True)


def product_ids(page) -> list[int]:
    return [int(i) for i in page.locator("#grid li").evaluate_all("items => items.map(i => i.dataset.productId)")]


def search(page, k: int) -> None:
    """Fill k, press Enter in it (submits the form), and wait for k results whose images loaded."""
    page.fill("#k", str(k))
    page.press("#k", "Enter")
    page.wait_for_function(GRID_LOADED, arg=k, timeout=90_000)


def test_search_from_a_photo_then_more_like_this(browser, system, indexed):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(f"{system}/")
    shot(page, "desktop-before")
    page.set_input_files("#image", QUERY)
    page.wait_for_function("document.getElementById('photo').naturalWidth > 0")

    page.click("summary")  # open the filters
    page.fill("#year-gte", "2016")  # an empty year range: the API's message shows at the year fields
    page.fill("#year-lte", "2012")
    page.click("#go")
    page.wait_for_function("document.getElementById('error-filters-year').textContent !== ''")
    assert "year range is empty" in page.text_content("#error-filters-year")
    assert page.get_attribute("#year-gte", "aria-invalid") == "true"
    page.fill("#year-gte", "")
    page.fill("#year-lte", "")

    photo = page.locator("#photo").bounding_box()  # a crop dragged with the mouse...
    page.mouse.move(photo["x"] + 5, photo["y"] + 5)
    page.mouse.down()
    page.mouse.move(photo["x"] + photo["width"] / 2, photo["y"] + photo["height"] / 2, steps=5)
    page.mouse.up()
    dragged = {name: int(page.input_value(f"#crop-{name}")) for name in "xywh"}
    assert dragged["w"] > 50 and dragged["h"] > 50 and page.is_visible("#box"), dragged
    for name, value in {"x": 10, "y": 10, "w": 150, "h": 200}.items():  # ...then typed in
        page.fill(f"#crop-{name}", str(value))
    assert page.is_visible("#box")
    start = time.perf_counter()
    search(page, k=6)
    searched_s = time.perf_counter() - start
    assert "150×200 px at (10, 10)" in page.text_content("#used")
    first = product_ids(page)
    assert len(set(first)) == 6
    assert page.get_attribute("#grid li img", "alt") == page.text_content("#grid li h3")
    shot(page, "desktop-after")

    clicked = first[0]
    page.click("#grid li:first-child button.more")
    page.wait_for_function("document.getElementById('results-title').textContent.startsWith('More like')")
    page.wait_for_function(GRID_LOADED, arg=6)
    more = product_ids(page)
    assert len(set(more)) == 6 and clicked not in more and set(more) != set(first)
    shot(page, "desktop-more-like-this")
    assert errors == []
    print(f"search to {len(first)} loaded results: {searched_s:.1f} s")


def test_at_phone_width(browser, system, indexed):  # noqa: F811
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True,
                            has_touch=True)
    page.goto(f"{system}/")
    shot(page, "phone-before")
    page.set_input_files("#image", QUERY)
    page.select_option("#category-level", "auto")
    page.click("#go")
    page.wait_for_function("document.querySelectorAll('#grid li').length > 0", timeout=90_000)
    used = page.text_content("#used")  # the watch's predicted categories, and the one `auto` searched in
    assert "Predicted category: master category: Accessories (" in used, used
    assert "Searched within" in used, used
    page.select_option("#category-level", "")
    search(page, k=4)
    shot(page, "phone-after")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    columns = page.evaluate("getComputedStyle(document.getElementById('grid')).gridTemplateColumns")
    assert len(columns.split()) == 2
