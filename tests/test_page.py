"""The web page in a real browser (Chromium via Playwright) against a real server."""
from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from test_api import live_server

from chestxray.serving import create_app

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app(tiny_artifacts):
    return create_app({"CHESTXRAY_ARTIFACTS": str(tiny_artifacts), "GEMINI_API_KEY": ""})


def test_upload_two_xrays_and_a_bad_file(browser, app, fullsize_dir, tmp_path):
    xrays = [sorted(fullsize_dir.glob("NORMAL/*.jpeg"))[0], sorted(fullsize_dir.glob("PNEUMONIA/*.jpeg"))[0]]
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is a text file renamed to .jpg\n" * 10)
    client = app.test_client()
    expected = [client.post("/predict", data={"file": (io.BytesIO(p.read_bytes()), p.name)}).get_json()
                for p in xrays]

    with live_server(app) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 1600})
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.goto(url + "/")
        assert "not a diagnosis" in page.locator("#disclaimer").inner_text()
        assert page.locator("#disclaimer").is_visible()
        link = page.locator("#model-card-link")
        assert link.is_visible() and link.get_attribute("href") == "/model/card?format=html"

        page.set_input_files("#files", [str(p) for p in xrays] + [str(bad)])
        page.wait_for_function("document.querySelectorAll('.result.done, .result.failed').length === 3",
                               timeout=60_000)
        cards = page.locator(".result")
        assert cards.count() == 3

        for i, want in enumerate(expected):
            card = cards.nth(i)
            assert card.locator(".file-name").inner_text() == xrays[i].name
            assert card.locator(".predicted-class").inner_text() == want["predicted_class"]
            assert f"{100 * want['confidence']:.1f}%" in card.locator(".confidence").inner_text()
            bars = card.locator(".bar-row")
            assert bars.count() == 2
            for j, cls in enumerate(["NORMAL", "PNEUMONIA"]):
                assert bars.nth(j).get_attribute("data-class") == cls
                width = bars.nth(j).locator(".bar").evaluate("e => e.style.width")
                assert width == f"{100 * want['probabilities'][cls]:.1f}%"
            assert card.locator(".low-confidence").is_visible() == want["low_confidence"]
            assert "No explanation" in card.locator(".explanation-missing").inner_text()
            assert "GEMINI_API_KEY" in card.locator(".explanation-missing").inner_text()

            picture, toggle = card.locator(".picture"), card.locator(".overlay-toggle")
            assert picture.get_attribute("src").startswith("blob:")
            toggle.check()
            assert picture.get_attribute("src").startswith("data:image/png;base64,")
            assert picture.evaluate("e => e.complete && e.naturalWidth") > 0
            toggle.uncheck()
            assert picture.get_attribute("src").startswith("blob:")

        error = cards.nth(2).locator(".error")
        assert error.is_visible()
        assert "not a JPEG, PNG or DICOM image" in error.inner_text()
        assert cards.nth(2).locator(".body").is_hidden()

        cards.nth(0).locator(".overlay-toggle").check()
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 1000 and height >= 800 and len(data) > 50_000
        # The only failed request is the bad file's (415); no script errors, no missing resources.
        assert len(console_errors) == 1 and "415" in console_errors[0], console_errors
        page.close()


def test_model_card_link_opens_the_card(browser, app):
    with live_server(app) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.click("#model-card-link")
        page.wait_for_url("**/model/card?format=html")
        assert page.locator("#model-card h1").inner_text() == "Model card: tiny test model"
        assert page.locator("#model-card table td").first.inner_text() == "train"
        page.close()


def test_drag_and_drop_shows_error_next_to_file(browser, app):
    with live_server(app) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.evaluate("""() => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(0)], "empty.png", {type: "image/png"}));
            document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true}));
        }""")
        page.wait_for_selector(".result.failed", timeout=30_000)
        card = page.locator(".result").first
        assert card.locator(".file-name").inner_text() == "empty.png"
        assert "the file is empty" in card.locator(".error").inner_text()
        page.close()
