"""The app in a real browser: headless Chromium (Debian's package) driven by Playwright.

Opens the page, types a prompt, moves the strength slider, clicks Generate, waits for the
image and saves a screenshot.  Needs ``/usr/bin/chromium`` (``install.sh`` installs it with
apt when run as root, as in CI) and the ``playwright`` package (the ``dev`` extra).  A missing
browser is a failure with a message saying how to install it, never a silent skip.
Set ``OD_SCREENSHOT_DIR`` to also keep a screenshot of every tab there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from _app_server import app_server

CHROMIUM = os.environ.get("OD_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the browser test needs Debian's chromium package "
            "(run ./install.sh as root, or: apt-get update && apt-get install -y chromium)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -c constraints.txt -e '.[dev]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium"),
                              headless=True, args=LAUNCH_ARGS)
        yield b
        b.close()


def test_type_prompt_move_slider_generate_screenshot(browser, tmp_path):
    server = app_server()
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.goto(server.url, timeout=60_000)
        prompt = page.locator("#prompt textarea")
        prompt.wait_for(timeout=60_000)
        prompt.fill("a sks circle on a black background")

        slider = page.locator("#t-slider input[type=range]")
        slider.fill("0.5")  # sets the value and fires input/change, as dragging does
        number = page.locator("#t-slider input[type=number]")
        assert float(number.input_value()) == pytest.approx(0.5)

        page.locator("#generate-btn").click()
        status = page.locator("#generate-status")
        status.get_by_text("done in").wait_for(timeout=90_000)
        text = status.inner_text()
        # The status names what was rendered: the slider's t reached the server (the test
        # server preselects its first subject adapter).
        assert "t = 0.50" in text, text
        image = page.locator("#output-image img")
        image.wait_for(timeout=30_000)
        assert image.get_attribute("src")

        # Typing a strength into the slider's number box regenerates without a click.
        number.fill("0.3")
        number.press("Enter")
        status.get_by_text("t = 0.30").wait_for(timeout=90_000)
        shot = tmp_path / "generate.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000

        keep = os.environ.get("OD_SCREENSHOT_DIR")
        if keep:
            _screenshot_tabs(page, Path(keep))
    finally:
        page.close()


def _screenshot_tabs(page, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / "app-generate.png"), full_page=True)
    for tab, name in (("Train a subject", "app-train-subject"), ("Train a control", "app-train-control"),
                      ("Adapters", "app-adapters")):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
