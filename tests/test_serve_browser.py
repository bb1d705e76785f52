"""`fashion-cnn serve` in a real browser: uvicorn serves a model1 run trained briefly on real
Fashion-MNIST, headless Chromium (Debian's package, driven by Playwright) opens the page and
uploads test images through its file input. Checked: no console error or warning, no request
to anything but the server, each image's true class on top, a Grad-CAM heatmap shown, the
run's figures decoded on the second tab. Screenshots are saved and their paths printed
(FASHION_CNN_SERVE_SCREENSHOT=path also copies the first there, as docs/images/serve.png was).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fashion_cnn as fc
from fashion_cnn.apps.predict import predict_arrays
from fashion_cnn.apps.serve import create_app

pytestmark = [pytest.mark.browser, pytest.mark.realdata]

CHROMIUM = shutil.which("chromium")
PAGE_SIZE = {"width": 1280, "height": 900}  # CSS pixels of the viewport
IMAGES = 3  # test images uploaded, of different classes, each one the model gets right


@pytest.fixture(scope="module")
def run(real_data, tmp_path_factory):
    """model1 trained for 2 epochs on 2,000 real training images, with its figures."""
    root = tmp_path_factory.mktemp("serve-browser")
    result = fc.train("seed-model1", root / "run", data=real_data, progress=False,
                      subset=2000, epochs=2, threads=1)
    return result.run_dir


@pytest.fixture(scope="module")
def server(run):
    """uvicorn serving the run on a free loopback port, in a thread; its base URL."""
    import uvicorn

    app = create_app(run)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # bound here: the port is known before uvicorn starts
    config = uvicorn.Config(app, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make test` installs it)")
    with sync_api.sync_playwright() as driver:
        # Debian's chromium, never a downloaded one; --no-sandbox: tests may run as root
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def chosen_images(run_dir, data, folder: Path) -> list[tuple[Path, str]]:
    """PNG files of IMAGES test images of different classes that the model classifies right
    (the page is tested here, not the model), with their true class names."""
    cfg, model = fc.load_model(run_dir)
    images, labels = data.test_images[:300], data.test_labels[:300]
    predicted = predict_arrays(model, cfg, images).argmax(1)
    chosen, classes = [], set()
    for index in np.flatnonzero(predicted == labels):
        if labels[index] not in classes and len(chosen) < IMAGES:
            classes.add(labels[index])
            path = folder / f"test-{index:04d}.png"
            Image.fromarray(images[index]).save(path)
            chosen.append((path, cfg.class_names[labels[index]]))
    assert len(chosen) == IMAGES
    return chosen


def wait_until(page, expression: str, timeout: float = 30.0) -> None:
    """Poll a JavaScript expression from here: Playwright's wait_for_function evaluates its
    predicate with eval(), which the page's Content-Security-Policy (rightly) forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def watch(page, base_url: str) -> tuple[list, list]:
    """Collect the page's console errors and warnings (CSP violations among them), uncaught
    exceptions, and every request to anywhere but the server."""
    problems, foreign = [], []
    page.on("console", lambda message: problems.append(f"console {message.type}: "
                                                       f"{message.text}")
            if message.type in ("error", "warning", "assert") else None)
    page.on("pageerror", lambda error: problems.append(f"exception: {error}"))
    page.on("requestfailed", lambda request: problems.append(f"failed: {request.url}"))
    page.on("response", lambda response: problems.append(f"{response.status}: {response.url}")
            if response.status >= 400 else None)
    page.on("request", lambda request: None if request.url.startswith(base_url)
            or request.url.startswith(("data:", "blob:")) else foreign.append(request.url))
    return problems, foreign


def test_upload_through_the_page_shows_the_true_class_and_a_heatmap(browser, server, run,
                                                                    real_data, tmp_path):
    chosen = chosen_images(run, real_data, tmp_path)
    page = browser.new_page(viewport=PAGE_SIZE)
    problems, foreign = watch(page, server)
    page.goto(server)
    page.locator("#facts li").first.wait_for()
    assert fc.RunDir(run).path.name in page.inner_text("#run-name")
    # one file at a time, as a person picks them; the newest card comes first
    for count, (path, _) in enumerate(chosen, 1):
        page.set_input_files("#files", str(path))
        wait_until(page, f"document.querySelectorAll('.card .prediction').length >= {count}")
    wait_until(page, "Array.from(document.images).every(i => i.complete)")
    cards = page.evaluate("""Array.from(document.querySelectorAll('.card'), card => ({
        file: card.querySelector('.file').textContent,
        top: card.querySelector('.prediction').textContent,
        bars: Array.from(card.querySelectorAll('.bars > span:not(.pct)'), s => s.textContent),
        images: Array.from(card.querySelectorAll('img'), i => ({
            cls: i.className, width: i.naturalWidth, height: i.naturalHeight,
            shown: i.getBoundingClientRect().width}))}))""")
    screenshot = tmp_path / "serve.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
    keep = os.environ.get("FASHION_CNN_SERVE_SCREENSHOT")
    if keep:  # a copy where a person can look at it (docs/images/serve.png)
        shutil.copyfile(screenshot, keep)
    page.close()

    assert problems == [] and foreign == []
    assert len(cards) == IMAGES
    for card, (path, true_class) in zip(cards, reversed(chosen)):
        assert card["file"] == path.name
        assert card["top"] == true_class and card["bars"][0] == true_class
        assert len(card["bars"]) == 5  # the page asks for the top 5
        kinds = {image["cls"]: image for image in card["images"]}
        assert kinds["pixels heatmap"]["width"] == 28 and kinds["pixels heatmap"]["shown"] > 60
        assert kinds["pixels input"]["width"] == 28
        assert all(image["width"] > 0 for image in card["images"])
    assert screenshot.stat().st_size > 20_000


def test_the_figures_tab_shows_the_runs_figures(browser, server, run, tmp_path):
    page = browser.new_page(viewport=PAGE_SIZE)
    problems, foreign = watch(page, server)
    page.goto(server)
    page.locator("#facts li").first.wait_for()
    page.click("#tab-figures")
    wait_until(page, "document.querySelectorAll('#figures img').length > 0 && "
               "Array.from(document.querySelectorAll('#figures img')).every(i => i.complete)")
    figures = page.evaluate("Array.from(document.querySelectorAll('#figures img'), i => "
                            "({src: i.getAttribute('src'), width: i.naturalWidth}))")
    assert page.is_hidden("#panel-classify")
    screenshot = tmp_path / "serve-figures.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")
    page.close()

    assert problems == [] and foreign == []
    names = [figure["src"].rsplit("/", 1)[1] for figure in figures]
    assert {"metrics.png", "confusion_matrix.png", "misclassified.png"} <= set(names)
    assert all(figure["width"] > 100 for figure in figures)


def test_a_file_the_server_refuses_gets_an_error_card(browser, server, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    page = browser.new_page(viewport=PAGE_SIZE)
    problems, foreign = watch(page, server)
    page.goto(server)
    page.locator("#facts li").first.wait_for()
    page.set_input_files("#files", str(notes))
    wait_until(page, "document.querySelectorAll('.card.failed .error').length > 0")
    message = page.inner_text(".card.failed .error")
    page.close()
    # the browser itself reports the 415 answer to fetch; nothing else may go wrong
    expected = [p for p in problems if "415" in p and ("api/predict" in p or "status of 415" in p)]
    assert expected and [p for p in problems if p not in expected] == [] and foreign == []
    assert message.startswith("notes.txt: its content type is text/plain, not an image type")
