"""The study report in a real browser: headless Chromium loads report.html with no console
error, no network request and every image decoded; a screenshot is saved for a person to see.

Chromium is Debian's package, driven by Playwright (launched on that executable: Playwright's
own browser download is never used).
"""

from __future__ import annotations

import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fashion_cnn.analysis.study_run import run_study

CHROMIUM = shutil.which("chromium")
PAGE_WIDTH = 1280  # CSS pixels of the screenshot's viewport

# A two-run study: a plain and an augmented model, so every kind of report figure appears.
TINY_STUDY = """
name = "tiny"
description = "Two quick runs for the browser test"
epochs_scale = 0.04
subset = 600
[reference]
keras = "made-up reference numbers for the test"
[[runs]]
recipe = "seed-model1"
reference = { seed_test_accuracy = 0.9, keras_test_accuracy = 0.9044, keras_train_seconds = 262.6 }
[[runs]]
recipe = "seed-model4"
baseline = "seed-model1"
change = "padded input and augmentation"
"""


@pytest.fixture(scope="module")
def report_html(tmp_path_factory, real_data) -> Path:
    root = tmp_path_factory.mktemp("browser")
    (root / "tiny.toml").write_text(TINY_STUDY)
    result = run_study(str(root / "tiny.toml"), root / "study", progress=False, data=real_data,
                       log=lambda line: None)
    return result.report[0]


class _Resources(HTMLParser):
    """Every tag and URL-bearing attribute of a page, to prove it needs nothing outside."""

    def __init__(self):
        super().__init__()
        self.tags: set[str] = set()
        self.urls: list[str] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self._in_style = tag == "style"
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "poster", "data") and value:
                self.urls.append(value)
            if name == "style" and value:
                self.styles.append(value)
            assert not name.startswith("on"), f"inline event handler {name}= in <{tag}>"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.styles.append(data)


def test_report_html_is_self_contained(report_html):
    page = report_html.read_text()
    parser = _Resources()
    parser.feed(page)
    assert not parser.tags & {"script", "link", "iframe", "object", "embed", "base", "video",
                              "audio", "source"}
    assert parser.urls and all(u.startswith("data:image/png;base64,") for u in parser.urls)
    css = " ".join(parser.styles).lower()
    assert "url(" not in css and "@import" not in css and "@font-face" not in css


@pytest.mark.browser
def test_report_in_headless_chromium(report_html, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make test` installs it)")
    page_url = report_html.resolve().as_uri()
    problems, requests = [], []
    with sync_api.sync_playwright() as driver:
        # Debian's chromium, never a downloaded one; --no-sandbox: tests may run as root
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": PAGE_WIDTH, "height": 900})
            # console errors and warnings include the browser's own log (failed loads, ...)
            page.on("console", lambda message: problems.append(f"{message.type}: {message.text}")
                    if message.type in ("error", "warning", "assert") else None)
            page.on("pageerror", lambda error: problems.append(f"exception: {error}"))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(page_url, wait_until="load")
            images = page.evaluate("Array.from(document.images, i => "
                                   "({alt: i.alt, complete: i.complete, width: i.naturalWidth}))")
            overflow = page.evaluate(
                "Array.from(document.querySelectorAll('main > *'), e => "
                "e.getBoundingClientRect().right).filter(r => r > innerWidth).length")
            screenshot = tmp_path / "report.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    keep = os.environ.get("FASHION_CNN_SCREENSHOT")
    if keep:  # a copy where a person can look at it
        shutil.copyfile(screenshot, keep)
    print(f"screenshot: {screenshot}")

    assert problems == []
    assert [url for url in requests if url != page_url and not url.startswith("data:")] == []
    assert page_url in requests  # the request events did watch the page load
    # references, learning curves, weights, 2 confusion matrices, 2 Grad-CAM figures,
    # 1 augmentation preview
    assert len(images) == 8
    assert all(image["complete"] and image["width"] > 0 for image in images), images
    assert overflow == 0, "a section is wider than the page"
    assert screenshot.stat().st_size > 10_000
