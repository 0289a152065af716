"""The web page at / in headless Chromium (Debian's package), driven by Playwright."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.images import face_png
from tests.server import AppServer, get

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def test_page_is_self_contained() -> None:
    html = (Path(__file__).resolve().parent.parent / "app" / "static" / "index.html").read_text()
    assert not re.search(r"(src|href)=[\"']https?://", html), "the page must work offline: no CDN, no external font"
    assert "/predict" in html and "/metrics" in html


def test_index_is_served(server: AppServer) -> None:
    response = get(f"{server.url}/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "fer-service" in response.text


@pytest.fixture(scope="module")
def playwright():  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (dev extra)")
    with sync_api.sync_playwright() as running:  # one per module: Playwright's sync API allows one at a time
        yield running


@pytest.fixture(scope="module")
def browser(playwright):  # type: ignore[no-untyped-def]
    launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
    yield launched
    launched.close()


def fer_image(tmp_path: Path) -> Path:
    value = os.environ.get("FER2013_DIR")
    if value and (Path(value) / "val" / "happy").is_dir():
        return sorted((Path(value) / "val" / "happy").glob("*.jpg"))[0]
    path = tmp_path / "face.png"
    path.write_bytes(face_png(3))
    return path


def test_upload_shows_label_bars_and_accuracy(server: AppServer, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    page = browser.new_page()
    page.goto(f"{server.url}/")
    # The shipped checkpoint stores ten-crop figures, so the page offers ten-crop, ticked.
    page.wait_for_selector("#tencrop", state="visible", timeout=10_000)
    assert page.is_checked("#tencrop")
    with page.expect_request(lambda request: "/predict" in request.url) as sent:
        page.set_input_files("#file", str(fer_image(tmp_path)))
    assert "tta=tencrop" in sent.value.url
    # Waited on with a locator, not a JavaScript expression: the page's CSP refuses eval, and should.
    page.locator("[data-testid=bar]").nth(6).wait_for(timeout=30_000)
    assert page.locator("[data-testid=bar]").count() == 7
    label = page.text_content("#label") or ""
    assert re.match(r"^(angry|disgust|fear|happy|neutral|sad|surprise) \(\d+%\)$", label), label
    assert not page.is_visible("#error")
    tencrop = get(f"{server.url}/metrics", params={"tta": "tencrop"}).json()
    shown = page.text_content("#accuracy") or ""
    assert f"{100 * tencrop['accuracy']:.1f}% against its original labels" in shown
    assert f"{100 * tencrop['ferplus']['accuracy']:.1f}% against the FER+ crowd's majority" in shown
    screenshot = os.environ.get("FER_WEB_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot, full_page=True)
    # Unticked: the server's own mode, its figures, and the same image classified again with it.
    with page.expect_request(lambda request: "/predict" in request.url) as sent:
        page.uncheck("#tencrop")
    assert "tta=none" in sent.value.url
    metrics = get(f"{server.url}/metrics").json()
    assert f"{100 * metrics['accuracy']:.1f}%" in (page.text_content("#accuracy") or "")
    page.close()


def test_upload_of_a_text_file_shows_a_readable_error(server: AppServer, browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a photo")
    page = browser.new_page()
    page.goto(f"{server.url}/")
    page.set_input_files("#file", str(notes))
    page.wait_for_selector("#error", state="visible", timeout=30_000)
    text = page.text_content("#error") or ""
    assert "Could not classify this file (400)" in text and "not a recognisable image" in text
    page.close()


def test_live_mode_draws_a_box_with_a_label_over_the_fake_camera(server: AppServer, playwright, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.images import write_y4m

    camera = write_y4m(tmp_path / "camera.y4m", [(260, 180)])
    flags = [
        *CHROMIUM_FLAGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-video-capture={camera}",
    ]  # fmt: skip
    # The fake camera plays the file: Chromium takes it only at launch, so this test has its own browser.
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
    try:
        page = browser.new_page()
        page.goto(f"{server.url}/")
        page.click("#live")
        page.locator("#overlay[data-faces='1']").wait_for(state="attached", timeout=30_000)
        label = page.get_attribute("#overlay", "data-labels") or ""
        assert re.match(r"^(angry|disgust|fear|happy|neutral|sad|surprise) \d+%$", label), label
        assert not page.is_visible("#error")
        assert "face" in (page.text_content("#livenote") or "")
        page.click("#live")  # stop
        assert page.text_content("#live") == "Live"
    finally:
        browser.close()
