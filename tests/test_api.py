"""The JSON API: every endpoint via the test client, a real server over HTTP, bad uploads, consistency."""
from __future__ import annotations

import base64
import io
import logging
import os

import cv2
import numpy as np
import pytest
import requests
from helpers import (API_KEYS, CLASSES, ROOT, assert_error, assert_prediction, dicom_bytes, live_server, png_bytes,
                     upload)

from chestxray.serving import create_app


@pytest.fixture(scope="module")
def app(tiny_artifacts):
    # Open mode, no rate limit: this module sends far more than a burst; test_security.py covers both.
    return create_app({"CHESTXRAY_ARTIFACTS": str(tiny_artifacts), "GEMINI_API_KEY": "",
                       "CHESTXRAY_RATE_LIMIT_PER_MIN": 0})


@pytest.fixture(scope="module")
def xray(xrays) -> bytes:
    return xrays[-1].read_bytes()


# --- endpoints ----------------------------------------------------------------------------------

def test_health_ready(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json()["status"] == "ready"
    assert response.get_json()["model_version"].startswith("sha256:")


def test_model_info(client):
    body = client.get("/model/info").get_json()
    assert body["classes"] == CLASSES
    assert body["input_size"] == [96, 96, 3]
    assert body["backbone"] == "mobilenetv2"
    assert body["trained_at"].startswith("2026-01-01")
    assert body["test_metrics"] == {"accuracy": 0.5, "roc_auc": 0.5}
    assert body["thresholds"] == {"decision_threshold": 0.5, "low_confidence": 0.6, "temperature": 1.0}
    assert body["tta"] is False
    assert body["model_card"] == "/model/card"
    assert body["model_version"].startswith("sha256:")


def test_predict_jpeg(client, xray):
    response = client.post("/predict", data=upload(xray))
    assert response.status_code == 200
    assert_prediction(response.get_json())


def test_predict_batch_keeps_order_with_errors(client, xrays):
    files = [(io.BytesIO(xrays[0].read_bytes()), "a.jpeg"), (io.BytesIO(b"not an image"), "b.jpg"),
             (io.BytesIO(xrays[-1].read_bytes()), "c.jpeg"), (io.BytesIO(b""), "d.png")]
    response = client.post("/predict/batch", data={"files": files})
    assert response.status_code == 200
    body = response.get_json()
    assert body["count"] == 4 and body["errors"] == 2
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert_prediction(results[0])
    assert_prediction(results[2])
    assert results[1]["error"] == "unsupported_type" and results[1]["message"]
    assert results[3]["error"] == "empty_file" and results[3]["message"]
    single = client.post("/predict", data=upload(xrays[-1].read_bytes())).get_json()
    assert results[2]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


def test_predict_batch_too_many_files(client, xray, app):
    n = app.config["CHESTXRAY_MAX_BATCH"] + 1
    response = client.post("/predict/batch", data={"files": [(io.BytesIO(xray), f"{i}.jpeg") for i in range(n)]})
    assert_error(response, 400, "too_many_files")


def test_predict_batch_missing_field(client, xray):
    assert_error(client.post("/predict/batch", data=upload(xray)), 400, "missing_file")


def test_explain_predicted_class_overlay_at_original_size(client, xray):
    response = client.post("/predict/explain", data=upload(xray))
    assert response.status_code == 200
    body = response.get_json()
    assert_prediction(body)
    assert body["gradcam_class"] == body["predicted_class"]
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(body["gradcam_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    original = cv2.imdecode(np.frombuffer(xray, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert overlay.shape == (*original.shape, 3)
    assert body["explanation"] is None
    assert "GEMINI_API_KEY" in body["explanation_error"]


def test_explain_requested_class(client, xray):
    bodies = {c: client.post("/predict/explain", data={**upload(xray), "class": c}).get_json() for c in CLASSES}
    assert [bodies[c]["gradcam_class"] for c in CLASSES] == CLASSES
    assert bodies["NORMAL"]["gradcam_png"] != bodies["PNEUMONIA"]["gradcam_png"]
    assert bodies["NORMAL"]["predicted_class"] == bodies["PNEUMONIA"]["predicted_class"]


def test_explain_unknown_class(client, xray):
    assert_error(client.post("/predict/explain", data={**upload(xray), "class": "CANCER"}), 400, "unknown_class")


def test_openapi_describes_every_endpoint(client, app, tiny_artifacts):
    doc = client.get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/health", "/model/info", "/model/card", "/predict", "/predict/batch",
                                 "/predict/explain", "/admin/reload", "/monitoring", "/metrics", "/openapi.json"}
    blueprints = ("api", "admin", "monitoring", "metrics")
    rules = {r.rule: r for r in app.url_map.iter_rules() if r.endpoint.split(".")[0] in blueprints}
    assert set(rules) == set(doc["paths"])
    assert "Error" in doc["components"]["schemas"]
    # This app runs in open mode: nothing needs a key, so the document asks for none and promises no 401.
    for path, rule in rules.items():
        for operation in doc["paths"][path].values():
            assert "security" not in operation and "401" not in operation["responses"], path
    # With keys configured, what needs a key in the document is exactly what the code guards.
    keyed = create_app({"CHESTXRAY_ARTIFACTS": str(tiny_artifacts), "CHESTXRAY_API_KEYS": API_KEYS})
    keyed_doc = keyed.test_client().get("/openapi.json").get_json()
    for path, rule in rules.items():
        guarded = hasattr(app.view_functions[rule.endpoint], "required_role")
        for operation in keyed_doc["paths"][path].values():
            assert ("security" in operation) == guarded == ("401" in operation["responses"]), path


def test_page_is_served(client):
    response = client.get("/")
    assert response.status_code == 200
    assert b"not a diagnosis" in response.data
    assert client.get("/static/app.js").status_code == 200


# --- bad requests: each a 4xx JSON with words, never a 500 ---------------------------------------

def _small_png() -> bytes:
    return png_bytes(np.full((100, 100), 128, np.uint8))


def _huge_png() -> bytes:
    return png_bytes(np.zeros((200, 4200), np.uint8))


BAD_UPLOADS = {
    "wrong type (GIF)": (b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + b"\x00" * 40, "scan.gif", 415, "unsupported_type"),
    "wrong type (PDF)": (b"%PDF-1.4\n" + b"x" * 200, "scan.pdf", 415, "unsupported_type"),
    "text renamed .jpg": (b"this is just some text, not an x-ray\n" * 20, "scan.jpg", 415, "unsupported_type"),
    "0 bytes": (b"", "scan.jpeg", 400, "empty_file"),
    "too small": (_small_png(), "scan.png", 422, "image_too_small"),
    "too large a side": (_huge_png(), "scan.png", 422, "image_too_large"),
}


@pytest.mark.parametrize("endpoint", ["/predict", "/predict/explain"])
@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads(client, endpoint, case):
    data, name, status, code = BAD_UPLOADS[case]
    assert_error(client.post(endpoint, data=upload(data, name)), status, code)


@pytest.mark.parametrize("endpoint", ["/predict", "/predict/explain"])
def test_truncated_jpeg(client, xray, endpoint):
    body = assert_error(client.post(endpoint, data=upload(xray[: len(xray) // 2])), 422, "unreadable_image")
    assert "truncated" in body["message"]


@pytest.mark.parametrize("endpoint", ["/predict", "/predict/explain"])
def test_file_too_large(client, endpoint, app):
    limit = int(app.config["CHESTXRAY_MAX_UPLOAD_MB"] * 1024 * 1024)
    data = b"\xff\xd8\xff\xe0" + b"\x00" * limit
    body = assert_error(client.post(endpoint, data=upload(data)), 413, "file_too_large")
    assert "MB" in body["message"]


@pytest.mark.parametrize("endpoint", ["/predict", "/predict/explain"])
def test_request_over_the_one_file_limit_is_refused_from_its_length(client, app, endpoint):
    """A body longer than one file may be is refused from Content-Length, before it is read (JSON 413)."""
    limit = int(app.config["CHESTXRAY_MAX_UPLOAD_MB"] * 1024 * 1024)
    body = assert_error(client.post(endpoint, data=upload(b"\xff\xd8\xff" + bytes(limit + 200_000))), 413,
                        "request_too_large")
    assert "1 file per request" in body["message"]


@pytest.mark.parametrize("endpoint", ["/predict", "/predict/explain"])
def test_missing_field(client, xray, endpoint):
    assert_error(client.post(endpoint, data=upload(xray, field="image")), 400, "missing_file")
    assert_error(client.post(endpoint, data=b"raw bytes", content_type="image/jpeg"), 400, "missing_file")


def test_not_found_and_wrong_method_are_json(client):
    assert_error(client.get("/predict/nothing"), 404, "not_found")
    assert_error(client.get("/predict"), 405, "method_not_allowed")
    assert_error(client.delete("/health"), 405, "method_not_allowed")


def test_file_names_and_bytes_are_not_logged(client, xray, caplog):
    caplog.set_level(logging.DEBUG)
    client.post("/predict", data=upload(xray, "patient-jane-doe-1234.jpeg"))
    client.post("/predict", data=upload(b"secret text", "patient-john-roe-5678.jpg"))
    assert "jane-doe" not in caplog.text and "john-roe" not in caplog.text
    assert "secret text" not in caplog.text


# --- no model -------------------------------------------------------------------------------------

def test_missing_model_health_503_and_predictions_503(tmp_path, xray):
    app = create_app({"CHESTXRAY_ARTIFACTS": str(tmp_path / "nothing-here"), "GEMINI_API_KEY": ""})
    client = app.test_client()
    health = client.get("/health")
    assert health.status_code == 503
    assert "no trained model" in health.get_json()["message"]
    for endpoint in ["/predict", "/predict/explain"]:
        assert_error(client.post(endpoint, data=upload(xray)), 503, "model_unavailable")
    assert_error(client.post("/predict/batch", data=upload(xray, field="files")), 503, "model_unavailable")
    assert_error(client.get("/model/info"), 503, "model_unavailable")
    page = client.get("/")
    assert page.status_code == 200 and b"Model not available" in page.data


def test_bad_registry_uri_is_503_not_crash(tmp_path):
    app = create_app({"CHESTXRAY_MODEL_URI": "chestxray-latest", "GEMINI_API_KEY": ""})
    health = app.test_client().get("/health")
    assert health.status_code == 503
    assert "models:/" in health.get_json()["message"]


# --- a real server --------------------------------------------------------------------------------

def test_real_server(app, xrays):
    with live_server(app) as url:
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ready"
        with open(xrays[0], "rb") as fh:
            response = requests.post(f"{url}/predict", files={"file": ("a.jpeg", fh, "image/jpeg")}, timeout=30)
        assert response.status_code == 200
        assert_prediction(response.json())
        bad = requests.post(f"{url}/predict", files={"file": ("b.jpg", b"hello", "image/jpeg")}, timeout=30)
        assert bad.status_code == 415 and bad.headers["Content-Type"].startswith("application/json")
        assert bad.json()["error"] == "unsupported_type"
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in xrays[:3]]
        batch = requests.post(f"{url}/predict/batch", files=files, timeout=30).json()
        assert [r["index"] for r in batch["results"]] == [0, 1, 2] and batch["errors"] == 0
        missing = requests.get(f"{url}/nope", timeout=10)
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"


# --- serving matches training ---------------------------------------------------------------------
# With a model whose answer moves with the image (varying_exported; the tiny MobileNetV2 answers the
# same for every image, so agreeing with it proves nothing), served and training-path probabilities
# must be the same numbers, not merely close.

@pytest.fixture(scope="module")
def varying_client(varying_exported):
    return create_app({"CHESTXRAY_ARTIFACTS": str(varying_exported), "GEMINI_API_KEY": "",
                       "CHESTXRAY_RATE_LIMIT_PER_MIN": 0}).test_client()


@pytest.fixture(scope="module")
def training_path(varying_exported, xrays) -> np.ndarray:
    """Probabilities for the 16 full-size originals the way training and evaluation compute them: the
    tf.data reader (chestxray.data.dataset), Keras' model.predict, the fitted temperature."""
    import json

    import keras

    from chestxray.data.dataset import image_dataset
    from chestxray.evaluation.calibration import apply_temperature

    model = keras.saving.load_model(varying_exported / "training" / "model.keras")
    thresholds = json.loads((varying_exported / "evaluation" / "thresholds.json").read_text())
    raw = model.predict(image_dataset([str(p) for p in xrays], 96, 4), verbose=0)
    # The comparison below means something only if the model tells these films apart: measured, P(pneumonia)
    # spreads over 0.11-0.45 (std 0.08) across the 16; the tiny test model gives 0.4888 for all of them.
    assert len(raw) == 16 and raw[:, 1].std() > 0.03 and np.ptp(raw[:, 1]) > 0.2, raw[:, 1]
    return apply_temperature(raw, thresholds["temperature"])


def _probabilities(body: dict) -> list[float]:
    return [body["probabilities"][c] for c in CLASSES]


def test_served_predictions_equal_the_training_path(varying_client, varying_exported, training_path, xrays):
    """/predict, /predict/batch and the Predictor (ONNX and Keras) on each original's bytes give what
    training's reader and model.predict give, to 1e-4 (the export stage's own ONNX-vs-Keras bound)."""
    from chestxray.model.predictor import Predictor

    for i, path in enumerate(xrays):
        body = varying_client.post("/predict", data=upload(path.read_bytes(), path.name)).get_json()
        assert np.abs(np.array(_probabilities(body)) - training_path[i]).max() < 1e-4, path.name
    for start in range(0, len(xrays), 8):
        files = [(io.BytesIO(p.read_bytes()), p.name) for p in xrays[start : start + 8]]
        results = varying_client.post("/predict/batch", data={"files": files}).get_json()["results"]
        served = np.array([_probabilities(r) for r in results])
        assert np.abs(served - training_path[start : start + 8]).max() < 1e-4
    for backend in ("onnx", "keras"):
        clf = Predictor.from_artifacts(varying_exported, backend=backend)
        served = np.array([_probabilities(clf.predict_bytes(p.read_bytes()).to_dict()) for p in xrays])
        assert np.abs(served - training_path).max() < 1e-4, backend


def test_same_xray_as_png_rgb_or_dicom_is_predicted_as_the_jpeg(varying_client, training_path, xrays):
    """The same pixels uploaded as gray PNG, RGB PNG or DICOM (12-bit MONOCHROME2, 8-bit MONOCHROME1)
    are accepted and given the JPEG's probabilities (test_preprocess.py: the model inputs are identical)."""
    for i in (0, 5, 10, 15):  # two normal, two pneumonia films
        gray = cv2.imdecode(np.frombuffer(xrays[i].read_bytes(), np.uint8), cv2.IMREAD_GRAYSCALE)
        variants = {"gray.png": png_bytes(gray), "rgb.png": png_bytes(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)),
                    "scan.dcm": dicom_bytes(100 + gray.astype(np.uint16) * 15, "MONOCHROME2", 12),
                    "inverted.dcm": dicom_bytes(255 - gray, "MONOCHROME1", 8)}
        for name, data in variants.items():
            response = varying_client.post("/predict", data=upload(data, name))
            assert response.status_code == 200, (name, response.get_json())
            assert_prediction(response.get_json())
            served = np.array(_probabilities(response.get_json()))
            assert np.abs(served - training_path[i]).max() < 1e-4, (xrays[i].name, name)


# --- configuration --------------------------------------------------------------------------------

def test_settings_from_env_dotenv_and_overrides(tmp_path, monkeypatch):
    from chestxray.serving.config import load_settings, parse_model_uri

    monkeypatch.chdir(tmp_path)
    for name in ("CHESTXRAY_MAX_BATCH", "GEMINI_MODEL", "GEMINI_TIMEOUT_S", "CHESTXRAY_ARTIFACTS"):
        monkeypatch.setenv(name, "")  # recorded, so what .env loads below is undone after the test
        monkeypatch.delenv(name)
    (tmp_path / ".env").write_text("GEMINI_MODEL=from-dotenv\nCHESTXRAY_MAX_BATCH=7\n")
    monkeypatch.setenv("CHESTXRAY_MAX_BATCH", "3")  # the environment wins over .env
    settings = load_settings({"GEMINI_TIMEOUT_S": "2.5"})
    assert settings["CHESTXRAY_MAX_BATCH"] == 3
    assert settings["GEMINI_MODEL"] == "from-dotenv"
    assert settings["GEMINI_TIMEOUT_S"] == 2.5
    assert settings["CHESTXRAY_ARTIFACTS"] == "artifacts"
    assert parse_model_uri("models:/chestxray@champion") == ("chestxray", "champion")
    monkeypatch.setenv("CHESTXRAY_MAX_BATCH", "lots")
    with pytest.raises(ValueError, match="CHESTXRAY_MAX_BATCH"):
        load_settings()
    monkeypatch.undo()  # what .env put in the environment goes with the test (checked here, not by a later test)
    assert os.environ.get("GEMINI_MODEL") != "from-dotenv" and os.environ.get("CHESTXRAY_MAX_BATCH") != "7"


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("Yes", True), ("on", True), ("false", False),
                                               ("0", False), ("", False)])
def test_tta_setting_is_a_real_boolean(monkeypatch, raw, expected):
    from chestxray.serving.config import load_settings

    monkeypatch.setenv("CHESTXRAY_TTA", raw)
    assert load_settings(dotenv=False)["CHESTXRAY_TTA"] is expected


def test_tta_setting_rejects_words_it_does_not_know(monkeypatch):
    from chestxray.serving.config import load_settings

    monkeypatch.setenv("CHESTXRAY_TTA", "maybe")
    with pytest.raises(ValueError, match="CHESTXRAY_TTA='maybe' is not a valid boolean"):
        load_settings(dotenv=False)


def test_every_setting_is_documented():
    """Each app setting has a row in the README's table and a line in .env.example."""
    from chestxray.serving.config import SETTINGS

    readme = (ROOT / "README.md").read_text()
    example = (ROOT / ".env.example").read_text()
    for name in SETTINGS:
        assert f"| `{name}` |" in readme, name
        assert f"{name}=" in example, name
