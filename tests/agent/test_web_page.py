"""The agent's page, driven in headless Chromium: type a prompt, generate, see progress and the image."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.agent.conftest import decode_image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
WAIT_MS = 60_000
# Set ZIMAGE_SCREENSHOTS=DIR to keep the screenshot for a look.
SCREENSHOT_DIR = Path(os.environ["ZIMAGE_SCREENSHOTS"]) if os.environ.get("ZIMAGE_SCREENSHOTS") else None


async def test_page_generates_an_image_in_chromium(start_agent, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    assert shutil.which(CHROMIUM), "this test needs Chromium: apt-get install chromium (done by .ci/run)"
    client = await start_agent(guard={"deny": ["forbidden"]})
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = await browser.new_page()
            await page.goto(str(client.make_url("/")))
            # The page asks the node for its model's own size and limits before anything else.
            await page.wait_for_function("document.body.dataset.model === 'loaded'", timeout=WAIT_MS, polling=100)
            assert await page.input_value("#width") == "1024"  # the tiny model has no size of its own
            assert await page.get_attribute("#width", "max") == "1536"  # the guard's max_side
            assert (await page.inner_text("#model")).startswith("diffusers (")
            await page.fill("#prompt", "a yellow square on a black background")
            await page.fill("#width", "128")
            await page.fill("#height", "96")
            await page.fill("#steps", "4")
            await page.fill("#seed", "12")
            await page.click("#go")
            await page.wait_for_function(
                "document.getElementById('result').dataset.seed === '12'", timeout=WAIT_MS, polling=100
            )
            assert await page.eval_on_selector("#progress", "p => [p.value, p.max]") == [4, 4]
            status = await page.inner_text("#status")
            assert status.startswith("done in")
            src = await page.get_attribute("#result", "src")
            assert src.startswith("data:image/png;base64,")
            assert decode_image(src.split(",", 1)[1]).size == (128, 96)
            await page.screenshot(path=str(SCREENSHOT_DIR / "page.png") if SCREENSHOT_DIR else str(tmp_path / "p.png"))

            await page.fill("#prompt", "a forbidden fruit")  # refused by the node: the page shows why
            await page.click("#go")
            await page.wait_for_function(
                "document.getElementById('status').className === 'error'", timeout=WAIT_MS, polling=100
            )
            assert "deny rule" in await page.inner_text("#status")
        finally:
            await browser.close()
