"""The study report in a real browser: headless Chromium loads report.html with no console
error, no network request and every image decoded; a screenshot is saved for a person to see.

Chromium is driven through the DevTools protocol over --remote-debugging-pipe (JSON messages,
each ended by a NUL byte, on file descriptors 3 and 4): no port, no websocket library.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fashion_cnn.analysis.report import write_report
from fashion_cnn.analysis.study_run import run_study

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars", "--mute-audio"]
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


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class DevTools:
    """A Chromium process and a DevTools session over its debugging pipe."""

    def __init__(self, user_data_dir: Path, timeout: float = 60.0):
        self.timeout = timeout
        # Pipe ends at 10 or above (and close-on-exec), so that putting them at 3 and 4 in the
        # child cannot overwrite one with the other.
        to_chrome_read, self._to_chrome = map(_high_fd, os.pipe())
        self._from_chrome, from_chrome_write = map(_high_fd, os.pipe())

        def wire_pipes():  # in the child: the protocol's fixed descriptors 3 (in) and 4 (out)
            os.dup2(to_chrome_read, 3)   # dup2 makes them inheritable; the rest stay
            os.dup2(from_chrome_write, 4)  # close-on-exec (PEP 446), so nothing else leaks

        self.process = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, "--remote-debugging-pipe",
             f"--user-data-dir={user_data_dir}", f"--window-size={PAGE_WIDTH},900", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            close_fds=False, preexec_fn=wire_pipes)
        os.close(to_chrome_read)
        os.close(from_chrome_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        """Send one command and wait for its answer (events that arrive meanwhile are kept)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._receive()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _receive(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError(f"no DevTools message within {self.timeout} s")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe: "
                                   + self.process.stderr.read().decode(errors="replace")[-2000:])
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


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
    if not Path(CHROMIUM).is_file():
        pytest.skip("chromium is not installed (`make test` installs it)")
    page_url = report_html.resolve().as_uri()
    browser = DevTools(tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget",
                               {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": PAGE_WIDTH, "height": 900, "deviceScaleFactor": 1,
                      "mobile": False}, session=session)
        browser.send("Page.navigate", {"url": page_url}, session=session)
        browser.wait_for("Page.loadEventFired")
        images = browser.send("Runtime.evaluate", {
            "expression": "JSON.stringify(Array.from(document.images, i => "
                          "({alt: i.alt, complete: i.complete, width: i.naturalWidth})))",
            "returnByValue": True}, session=session)["result"]["value"]
        height = browser.send("Runtime.evaluate", {
            "expression": "document.documentElement.scrollHeight",
            "returnByValue": True}, session=session)["result"]["value"]
        overflow = browser.send("Runtime.evaluate", {
            "expression": "Array.from(document.querySelectorAll('main > *'), e => "
                          "e.getBoundingClientRect().right).filter(r => r > innerWidth).length",
            "returnByValue": True}, session=session)["result"]["value"]
        shot = browser.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": PAGE_WIDTH, "height": height, "scale": 1}},
            session=session)
        browser.send("Runtime.evaluate", {"expression": "1"}, session=session)  # drain events
    finally:
        browser.close()
    screenshot = tmp_path / "report.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    keep = os.environ.get("FASHION_CNN_SCREENSHOT")
    if keep:  # a copy where a person can look at it
        shutil.copyfile(screenshot, keep)
    print(f"screenshot: {screenshot}")

    events = browser.events
    console = [e["params"] for e in events if e.get("method") == "Runtime.consoleAPICalled"
               and e["params"].get("type") in ("error", "assert", "warning")]
    exceptions = [e["params"] for e in events if e.get("method") == "Runtime.exceptionThrown"]
    log_errors = [e["params"]["entry"] for e in events if e.get("method") == "Log.entryAdded"
                  and e["params"]["entry"].get("level") in ("error", "warning")]
    requests = [e["params"]["request"]["url"] for e in events
                if e.get("method") == "Network.requestWillBeSent"]
    assert not console and not exceptions and not log_errors, (console, exceptions, log_errors)
    assert [url for url in requests if url != page_url and not url.startswith("data:")] == []
    assert page_url in requests  # the network domain did watch the page load

    images = json.loads(images)
    # references, learning curves, weights, 2 confusion matrices, 1 augmentation preview
    assert len(images) == 6
    assert all(image["complete"] and image["width"] > 0 for image in images), images
    assert overflow == 0, "a section is wider than the page"
    assert screenshot.stat().st_size > 10_000
