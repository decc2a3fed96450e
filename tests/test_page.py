"""The web page in a real browser (Chromium via Playwright) against a real server."""
from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from helpers import API_KEYS, USER_KEY, live_server, missing, png_bytes, save_artifacts

from chestxray.serving import create_app

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def wait_for_cards(page, n: int) -> None:
    """Until `n` result cards are finished (done or failed). A locator, not wait_for_function: the page's
    Content-Security-Policy forbids eval, which Playwright's string predicates need."""
    from playwright.sync_api import expect

    expect(page.locator(".result.done, .result.failed")).to_have_count(n, timeout=60_000)


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
        wait_for_cards(page, 3)
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
            assert card.locator(".population-warning").is_hidden()
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


def test_page_with_api_keys_asks_for_the_key_and_shows_refusals_in_words(browser, tiny_artifacts, fullsize_dir,
                                                                          tmp_path):
    from fuzz_corpus import png_header_only

    app = create_app({"CHESTXRAY_ARTIFACTS": str(tiny_artifacts), "GEMINI_API_KEY": "", "CHESTXRAY_API_KEYS": API_KEYS})
    xray = sorted(fullsize_dir.glob("NORMAL/*.jpeg"))[0]
    bomb = tmp_path / "huge.png"
    bomb.write_bytes(png_header_only(20000, 20000))
    with live_server(app) as url:
        page = browser.new_page()
        console_errors: list[str] = []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.goto(url + "/")
        assert page.locator("#api-key").is_visible()

        page.set_input_files("#files", [str(xray)])  # no key typed yet
        page.wait_for_selector(".result.failed", timeout=60_000)
        message = page.locator(".result").nth(0).locator(".error").inner_text()
        assert "send your API key in the X-API-Key header" in message and "Enter your API key" in message

        page.fill("#api-key", USER_KEY)
        page.set_input_files("#files", [str(xray), str(bomb)])
        wait_for_cards(page, 3)
        cards = page.locator(".result")
        assert "done" in cards.nth(1).get_attribute("class")
        assert cards.nth(1).locator(".predicted-class").inner_text() in ("NORMAL", "PNEUMONIA")
        assert "each side must be at most 4096 px" in cards.nth(2).locator(".error").inner_text()
        # The two refused requests (401, 422), and no Content-Security-Policy violation or script error.
        assert len(console_errors) == 2 and all("Failed to load resource" in e for e in console_errors), console_errors
        page.close()


def test_outside_validated_population_in_words(browser, ood_artifacts, fullsize_dir, tmp_path):
    """Two real X-rays, the warn threshold between them: the farther one is shown with its prediction and the
    server's words saying it is outside the validated population; the nearer one is shown plainly."""
    import shutil

    from helpers import set_reference_thresholds

    films = [sorted(fullsize_dir.glob("NORMAL/*.jpeg"))[0], sorted(fullsize_dir.glob("PNEUMONIA/*.jpeg"))[0]]
    root = tmp_path / "artifacts"
    for part in ("training", "evaluation", "reference"):
        shutil.copytree(ood_artifacts / part, root / part)
    client = create_app({"CHESTXRAY_ARTIFACTS": str(root), "GEMINI_API_KEY": ""}).test_client()
    distances = [client.post("/predict", data={"file": (io.BytesIO(p.read_bytes()), p.name)}).get_json()["ood_distance"]
                 for p in films]
    set_reference_thresholds(root, [sum(distances) / 2])
    app = create_app({"CHESTXRAY_ARTIFACTS": str(root), "GEMINI_API_KEY": ""})
    answers = [app.test_client().post("/predict", data={"file": (io.BytesIO(p.read_bytes()), p.name)}).get_json()
               for p in films]
    far = max((0, 1), key=lambda i: distances[i])
    words = answers[far]["warning_messages"]["outside_validated_population"]

    with live_server(app) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 1600})
        page.goto(url + "/")
        page.set_input_files("#files", [str(p) for p in films])
        wait_for_cards(page, 2)
        cards = page.locator(".result")
        warned, plain = cards.nth(far), cards.nth(1 - far)
        assert "done" in warned.get_attribute("class")  # answered, not refused
        assert warned.locator(".predicted-class").inner_text() == answers[far]["predicted_class"]
        warning = warned.locator(".population-warning")
        assert warning.is_visible() and warning.get_attribute("role") == "alert"
        assert "Outside the validated population" in warning.inner_text()
        assert warning.locator(".population-words").inner_text() == words
        assert "may be less reliable" in words
        assert plain.locator(".population-warning").is_hidden()
        assert plain.locator(".predicted-class").inner_text() == answers[1 - far]["predicted_class"]


def test_not_a_chest_xray_in_words(browser, ood_artifacts, fullsize_dir, tmp_path):
    """A photo is refused with the reason shown (the "not a chest X-ray" detector, issue #14: lead)."""
    import shutil

    from sklearn.datasets import load_sample_image

    xray = sorted(fullsize_dir.glob("NORMAL/*.jpeg"))[0]
    photo = tmp_path / "holiday.png"
    photo.write_bytes(png_bytes(load_sample_image("china.jpg")[..., ::-1]))
    root = tmp_path / "artifacts"
    for part in ("training", "evaluation", "reference", "xray_check"):
        shutil.copytree(ood_artifacts / part, root / part)
    app = create_app({"CHESTXRAY_ARTIFACTS": str(root), "GEMINI_API_KEY": ""})

    with live_server(app) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 1600})
        page.goto(url + "/")
        page.set_input_files("#files", [str(xray), str(photo)])
        wait_for_cards(page, 2)
        cards = page.locator(".result")
        assert cards.nth(0).locator(".predicted-class").inner_text() in ("NORMAL", "PNEUMONIA")
        error = cards.nth(1).locator(".error")
        assert error.is_visible() and "does not look like a chest X-ray" in error.inner_text()
        assert cards.nth(1).locator(".body").is_hidden()


@pytest.fixture(scope="module")
def three_class_artifacts(tmp_path_factory):
    """An untrained 3-class MobileNetV2 (96 px) laid out like artifacts/: enough to check the page shows 3 classes."""
    import keras

    from chestxray.model.build import build_model

    keras.utils.set_random_seed(1)
    model = build_model("mobilenetv2", 96, 3, weights="none", dropout=0.1)
    return save_artifacts(model, tmp_path_factory.mktemp("three"), ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"], 96,
                          "mobilenetv2")


def test_three_classes_give_three_bars_and_the_heatmap_of_the_predicted_class(browser, three_class_artifacts,
                                                                              fullsize_dir, tb256):
    tb = sorted((tb256 / "TUBERCULOSIS").glob("TB.*.jpg"))
    films = [sorted(fullsize_dir.glob("PNEUMONIA/*.jpeg"))[0], tb[0]]
    app = create_app({"CHESTXRAY_ARTIFACTS": str(three_class_artifacts), "GEMINI_API_KEY": ""})
    expected = [app.test_client().post("/predict", data={"file": (io.BytesIO(p.read_bytes()), p.name)}).get_json()
                for p in films]
    with live_server(app) as url:
        page = browser.new_page(viewport={"width": 1200, "height": 1600})
        page.goto(url + "/")
        page.set_input_files("#files", [str(p) for p in films])
        wait_for_cards(page, 2)
        for i, want in enumerate(expected):
            card = page.locator(".result").nth(i)
            bars = card.locator(".bar-row")
            assert bars.count() == 3
            assert [bars.nth(j).get_attribute("data-class") for j in range(3)] == ["NORMAL", "PNEUMONIA",
                                                                                   "TUBERCULOSIS"]
            for j, cls in enumerate(["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]):
                assert bars.nth(j).locator(".bar-value").inner_text() == f"{100 * want['probabilities'][cls]:.1f}%"
            assert card.locator(".bar-row.predicted").get_attribute("data-class") == want["predicted_class"]
            assert card.locator(".gradcam-note").inner_text() == f"(heatmap for {want['predicted_class']})"
