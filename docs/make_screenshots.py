#!/usr/bin/env python
"""Take the README's screenshots of the app, one per tab, by using it as a person would.

    .venv/bin/python docs/make_screenshots.py                  # embedded model -> docs/screenshots/
    .venv/bin/python docs/make_screenshots.py --model path/to/sd15 --out /tmp/shots

Starts ``app.py`` on a fresh data folder, then with headless Chromium (Debian's package,
driven by Playwright): generates (with the first built-in subject adapter, if one ships) and
sweeps t;
starts a short subject training on a built-in example subject and photographs it while it
runs (progress, loss, sample previews), then stops it; shows the control training form; and
selects an adapter in the Adapters tab.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(model: str | None, data_dir: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "app.py"), "--data-dir", str(data_dir), "--port", str(port), "--quiet"]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return proc
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the app did not start in time")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: the embedded model)")
    p.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--data-dir", default=None, help="data folder to start from (default: a fresh one)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="od-screens-"))
    port = free_port()
    data_dir = Path(args.data_dir) if args.data_dir else work / "data"
    proc = start_app(args.model, data_dir, port, work / "app.log")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#prompt textarea").wait_for(timeout=60_000)
            page.wait_for_timeout(1500)

            # Generate: the first subject adapter at t = 1, then a sweep across t.
            page.locator("#generate-btn").click()
            page.locator("#generate-status").get_by_text("done in").wait_for(timeout=120_000)
            page.locator("#sweep-btn").click()
            try:  # a sweep needs an adapter: with none selected the page says so instead
                page.locator("#sweep-gallery img").nth(1).wait_for(timeout=120_000)
            except PlaywrightTimeout:
                pass
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "app-generate.png"), full_page=True)

            # Train a subject: a built-in example subject, photographed while it runs.
            page.get_by_role("tab", name="Train a subject").click()
            panel = page.locator("#train-subject-panel")
            page.get_by_label("Built-in example subject").first.check()
            page.wait_for_timeout(500)
            steps = page.locator("#subject-steps input[type=number]")
            steps.fill(str(args.train_steps))
            steps.press("Enter")
            page.wait_for_timeout(500)
            page.locator("#subject-start").click()
            deadline = time.time() + 900
            while time.time() < deadline:
                if panel.locator(".od-samples img").count() >= 2:
                    break
                time.sleep(2)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / "app-train-subject.png"), full_page=True)
            page.locator("#subject-stop").click()
            page.wait_for_timeout(3000)

            page.get_by_role("tab", name="Train a control").click()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "app-train-control.png"), full_page=True)

            page.get_by_role("tab", name="Adapters").click()
            page.wait_for_timeout(1000)
            # Pick the first adapter in the "Selected adapter" dropdown (shows its details).
            page.get_by_label("Selected adapter").click()
            page.get_by_role("option").first.click()
            page.wait_for_timeout(2000)
            page.screenshot(path=str(out / "app-adapters.png"), full_page=True)
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    print(f"screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
