"""The README's picture of a review page: its top (metrics, plots) above its case table sorted by p_cancer.

    python docs/review_screenshot.py demo-out/review/index.html docs/review-page.png

Drives the system's Chromium through Playwright (pip install playwright; Debian: apt install chromium).
"""

import io
import shutil
import sys
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright


def main(page_path: str, out: str) -> None:
    """Two 1280x760 views of the page, stacked and scaled to 1000 pixels wide."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 760})
        page.goto(Path(page_path).resolve().as_uri())
        page.wait_for_load_state("load")
        top = page.screenshot()
        page.click("th:has-text('p_cancer')")
        page.evaluate("window.scrollTo(0, document.evaluate(\"//h2[text()='Cases']\", document, null, 9, null).singleNodeValue.offsetTop - 10)")
        page.wait_for_timeout(500)
        table = page.screenshot()
        browser.close()
    a, b = (Image.open(io.BytesIO(x)).convert("RGB") for x in (top, table))
    both = Image.new("RGB", (a.width, a.height + b.height + 6), (200, 200, 200))
    both.paste(a, (0, 0))
    both.paste(b, (0, a.height + 6))
    both.resize((1000, round(both.height * 1000 / both.width)), Image.LANCZOS).save(out, optimize=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
