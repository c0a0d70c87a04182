"""A screenshot of the HTML explorer in headless Chromium (Playwright), for docs and checks.

The browser is ``$FASTIF_BROWSER`` when set, else the first of ``chromium`` / ``chromium-browser`` /
``google-chrome`` on the PATH.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

BROWSER_ENV = "FASTIF_BROWSER"
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> Path | None:
    """The Chromium executable to drive: ``$FASTIF_BROWSER``, else one found on the PATH, else None."""
    configured = os.environ.get(BROWSER_ENV)
    if configured:
        return Path(configured) if Path(configured).is_file() else None
    found = next((shutil.which(name) for name in BROWSER_NAMES if shutil.which(name)), None)
    return Path(found) if found else None


def screenshot_explorer(html: Path, png: Path, click_test: int = 0, browser: Path | None = None) -> Path | None:
    """Open the explorer in headless Chromium, click a test point, save a PNG.

    ``browser`` defaults to :func:`find_browser`. Returns None when the browser or Playwright is missing (the report
    itself does not need them).
    """
    chromium = browser or find_browser()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None or not chromium.exists():
        return None
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(chromium), args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = launched.new_page(viewport={"width": 1500, "height": 950})
            page.goto(html.resolve().as_uri())
            page.locator(f'#panel-helpful circle.test-point[data-index="{click_test}"]').click(force=True)
            page.screenshot(path=str(png), full_page=True)
        finally:
            launched.close()
    return png
