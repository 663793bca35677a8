"""The web page at `/`, driven in a real headless Chromium (Debian's `chromium` package) through
Playwright: files chosen and dropped, URLs pasted, progress to 100%, labels read off the page,
a running task cancelled, results downloaded, the task in the address, a large task filtered
and paged. Each test saves a screenshot under `test-artifacts/`."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Page, async_playwright, expect

from testing.services import ROOT
from tests.conftest import PHOTOS_DIR, ImageServer, ServiceFactory
from tests.fakes import image

pytestmark = pytest.mark.e2e  # the page in a real Chromium

ARTIFACTS = ROOT / "test-artifacts"
# Headless, and quiet: without the background-networking flags Chromium keeps trying to reach
# Google's hosts, which this machine's closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000


def chromium() -> str:
    """Debian's Chromium (`run_tests.sh` installs it); ICS_CHROMIUM names another binary."""
    path = os.environ.get("ICS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("no Chromium: install Debian's chromium package (./run_tests.sh does) or set ICS_CHROMIUM")
    return path


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield await browser.new_page(viewport={"width": 1100, "height": 900})
        finally:
            await browser.close()


async def drop_file(page: Page, selector: str, path: Path) -> None:
    """What dragging a file from the desktop onto `selector` does: a drop event carrying it."""
    await page.evaluate(
        """([selector, name, encoded]) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: "image/jpeg"}));
            const drop = new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true});
            document.querySelector(selector).dispatchEvent(drop);
        }""",
        [selector, path.name, base64.b64encode(path.read_bytes()).decode()],
    )


async def test_the_page_classifies_files_and_urls_live(
    make_real_service: ServiceFactory, image_server: ImageServer, page: Page
) -> None:
    client = await make_real_service()
    await page.goto(str(client.make_url("/")))
    await expect(page.locator("#model option")).to_have_text(["efficientnet_lite0"])  # from GET /models

    await page.set_input_files("#files", str(PHOTOS_DIR / "coffee.jpg"))
    await drop_file(page, "#drop-zone", PHOTOS_DIR / "rocket.jpg")
    await expect(page.locator("#chosen-files li")).to_have_text(["coffee.jpg", "rocket.jpg"])
    await page.fill("#urls", f"{image_server.url('/photos/chelsea')}\n{image_server.url('/status/404')}\n")
    await page.click("#submit")

    await expect(page.locator("#progress-text")).to_contain_text("4 of 4 done (100%)", timeout=WAIT_MS)
    await expect(page.locator("#task-status")).to_have_text("completed")
    cards = page.locator("#items .item")
    await expect(cards.locator(".item-status")).to_have_text(["succeeded", "succeeded", "succeeded", "failed"])
    # The file name first (a long URL used to hide it), where it came from beside, the whole in the title.
    await expect(cards.locator(".source .name")).to_have_text(["coffee.jpg", "rocket.jpg", "chelsea", "404"])
    await expect(cards.nth(2).locator(".source .where")).to_have_text(f"127.0.0.1:{image_server.server.port}/photos/")
    await expect(cards.nth(3).locator(".source")).to_have_attribute("title", image_server.url("/status/404"))
    top_labels = [await card.locator(".label").first.text_content() for card in (await cards.all())[:3]]
    assert top_labels == ["espresso", "missile", "Egyptian cat"]
    score = await cards.nth(0).locator(".score").first.text_content() or ""
    assert score.endswith("%") and float(score[:-1]) == pytest.approx(95.0, abs=1.0)  # fp32 95.1%, bf16 94.9%
    await expect(cards.nth(3).locator(".item-error")).to_contain_text("http_error")
    thumbnails = await cards.locator(".thumb").evaluate_all("(images) => images.map((image) => image.naturalWidth)")
    assert all(width > 0 for width in thumbnails[:3])  # local files and the served photo all show
    await expect(cards.nth(3).locator(".thumb")).to_be_hidden()  # a failed item: a placeholder, no broken image
    await expect(cards.nth(3).locator(".placeholder")).to_have_text("http_error")

    task_id = await page.locator("#task-id").text_content()
    task = await (await client.get(f"/tasks/{task_id}")).json()  # the page shows what the API holds
    assert [item["labels"][0]["label"] for item in task["items"][:3]] == top_labels
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "web-page.png", full_page=True)

    for button, fmt in (("#download-csv", "csv"), ("#download-jsonl", "jsonl")):
        async with page.expect_download() as started:
            await page.click(button)
        download = await started.value
        assert download.suggested_filename == f"task-{task_id}.{fmt}"
        served = await client.get(f"/tasks/{task_id}/results", params={"format": fmt})
        assert Path(await download.path()).read_bytes() == await served.read()

    assert page.url.endswith(f"/#/tasks/{task_id}")  # the task is in the address: a reload shows it again
    await page.reload()
    await expect(page.locator("#task-id")).to_have_text(task_id or "")
    await expect(page.locator("#items .item .source .name")).to_have_text(
        ["coffee.jpg", "rocket.jpg", "chelsea", "404"]
    )
    await expect(page.locator("#items .item").nth(0).locator(".placeholder")).to_have_text("no preview")  # uploaded
    await expect(page.locator("#items .item").nth(2).locator(".label").first).to_have_text("Egyptian cat")
    icon = await client.get("/favicon.ico")
    assert icon.status == 200 and icon.content_type == "image/svg+xml"
    assert await page.locator("link[rel=icon]").get_attribute("href") == "/static/favicon.svg"
    assert (await client.get("/static/favicon.svg")).status == 200


async def test_a_large_task_is_filtered_and_paged(
    make_service: ServiceFactory, image_server: ImageServer, page: Page
) -> None:
    """150 images: a page of 60 cards at a time, filters by outcome and by top label."""
    image_server.files["cat"] = image("cat")
    image_server.files["dog"] = image("dog")
    client = await make_service(max_urls_per_task=200)
    urls = [image_server.url("/file/cat")] * 100 + [image_server.url("/file/dog")] * 40
    urls += [image_server.url("/status/404")] * 10
    task_id = (await (await client.post("/submit", json={"urls": urls})).json())["task_id"]
    await page.goto(str(client.make_url(f"/#/tasks/{task_id}")))  # a shared link
    await expect(page.locator("#task-status")).to_have_text("completed", timeout=WAIT_MS)
    options = page.locator("#filter option")
    await expect(options).to_have_text(["All (150)", "Failed (10)", "cat (100)", "dog (40)"])
    cards = page.locator("#items .item")
    await expect(cards).to_have_count(60)
    await expect(page.locator("#page-text")).to_have_text("Page 1 of 3 (1-60 of 150)")
    await expect(page.locator("#previous")).to_be_disabled()
    await page.click("#next")
    await page.click("#next")
    await expect(page.locator("#page-text")).to_have_text("Page 3 of 3 (121-150 of 150)")
    await expect(cards).to_have_count(30)
    await expect(page.locator("#next")).to_be_disabled()

    await page.select_option("#filter", "failed")
    await expect(cards).to_have_count(10)
    await expect(page.locator("#pager")).to_be_hidden()
    await expect(cards.locator(".placeholder")).to_have_text(["http_error"] * 10)
    await page.select_option("#filter", "label:dog")
    await expect(cards).to_have_count(40)
    await expect(cards.locator(".labels li:first-child .label")).to_have_text(["dog"] * 40)
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "web-page-filtered.png", full_page=True)


async def test_the_page_cancels_a_running_task(
    make_real_service: ServiceFactory, image_server: ImageServer, page: Page
) -> None:
    client = await make_real_service(read_timeout=60.0, download_timeout=60.0)
    await page.goto(str(client.make_url("/")))
    await page.fill("#urls", image_server.url("/slow/coffee?delay=30"))
    await page.click("#submit")
    await expect(page.locator("#task-status")).to_have_text("running", timeout=WAIT_MS)
    task_id = await page.locator("#task-id").text_content()
    async with asyncio.timeout(WAIT_MS / 1000):  # the download has started: the task is running
        while (await (await client.get(f"/tasks/{task_id}")).json())["status"] != "running":
            await asyncio.sleep(0.1)

    await page.click("#cancel")
    await expect(page.locator("#task-status")).to_have_text("cancelled")
    await expect(page.locator("#items .item-status")).to_have_text(["cancelled"])
    await expect(page.locator("#cancel")).to_be_disabled()
    assert (await (await client.get(f"/tasks/{task_id}")).json())["status"] == "cancelled"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "web-page-cancelled.png", full_page=True)


async def test_the_page_lists_recent_tasks_and_reopens_one(
    make_real_service: ServiceFactory, image_server: ImageServer, page: Page
) -> None:
    client = await make_real_service(read_timeout=60.0, download_timeout=60.0)
    done = await (await client.post("/submit", json={"urls": [image_server.url("/photos/chelsea")]})).json()
    running = await (
        await client.post(
            "/submit", json={"urls": [image_server.url("/photos/coffee"), image_server.url("/slow/rocket?delay=4")]}
        )
    ).json()
    async with asyncio.timeout(WAIT_MS / 1000):
        while (await (await client.get(f"/tasks/{done['task_id']}")).json())["status"] != "completed":
            await asyncio.sleep(0.1)

    await page.goto(str(client.make_url("/")))
    entries = page.locator("#recent-tasks li")
    await expect(entries).to_have_count(2)
    await expect(entries.nth(0)).to_contain_text(running["task_id"][:8])  # newest first
    await expect(entries.nth(1).locator(".status")).to_have_text("completed")

    await entries.nth(1).locator("button").click()  # a finished task: shown as it ended
    await expect(page.locator("#task-id")).to_have_text(done["task_id"])
    await expect(page.locator("#task-status")).to_have_text("completed")
    await expect(page.locator("#items .label").first).to_have_text("Egyptian cat")
    await expect(page.locator("#cancel")).to_be_disabled()

    await entries.nth(0).locator("button").click()  # a running one: its results so far, then live
    await expect(page.locator("#task-id")).to_have_text(running["task_id"])
    await expect(page.locator("#task-status")).to_have_text("running")
    await expect(page.locator("#items .item-status").nth(0)).to_have_text("succeeded", timeout=WAIT_MS)
    await expect(page.locator("#task-status")).to_have_text("completed", timeout=WAIT_MS)
    await expect(page.locator("#items .item-status")).to_have_text(["succeeded", "succeeded"])
    await expect(page.locator("#progress-text")).to_contain_text("2 of 2 done (100%)")
    await expect(entries.nth(0).locator(".status")).to_have_text("completed")  # the list follows
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=ARTIFACTS / "web-page-recent.png", full_page=True)


async def test_the_page_and_its_files_are_public_and_local(make_real_service: ServiceFactory) -> None:
    client = await make_real_service(api_keys="k-123")
    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    assert not re.search(r"""(src|href)=["']https?://""", await page.text()), "nothing from a CDN"
    for asset in ("/static/app.js", "/static/style.css"):
        assert (await client.get(asset)).status == 200, asset
    assert (await client.get("/models")).status == 401  # the API behind it still needs a key
