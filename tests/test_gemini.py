"""Gemini explanations against a local stub of the Gemini REST API (the real SDK, no patching)."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chestxray.explain.gemini import build_prompt, explain_prediction
from chestxray.serving import create_app

EXPLANATION = "The highlighted regions lie over the lower lung fields. A clinician must interpret the image."
# The stub's slow model answers long after the app's Gemini timeout; a test that waited for it would take
# SLOW_S, one that gave up at the timeout takes about TIMEOUT_S (the SDK is imported before the clock starts).
TIMEOUT_S = 3.0
SLOW_S = 30.0
GAVE_UP_BY_S = TIMEOUT_S + 5.0

PREDICTION = {"predicted_class": "PNEUMONIA", "confidence": 0.83,
              "probabilities": {"NORMAL": 0.17, "PNEUMONIA": 0.83}, "low_confidence": False}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class GeminiStub(BaseHTTPRequestHandler):
    """POST /v1beta/models/<model>:generateContent; the model name picks the behaviour."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        model = self.path.split("/models/", 1)[-1].split(":", 1)[0]
        GeminiStub.requests.append({"path": self.path, "key": self.headers.get("x-goog-api-key"), "body": body})
        if not self.path.startswith("/v1beta/models/") or not self.path.endswith(":generateContent"):
            return self._send(404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}})
        if model == "slow":
            time.sleep(SLOW_S)
        if model == "quota":
            return self._send(429, {"error": {"code": 429, "message": "Resource has been exhausted",
                                              "status": "RESOURCE_EXHAUSTED"}})
        if model == "broken":
            return self._send(500, {"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}})
        if model == "garbage":
            return self._send(200, b"<html>definitely not json</html>")
        if model == "truncated":
            return self._send(200, b'{"candidates": [{"content": {"parts": [{"text": "The hi')
        if model == "wrong-shape":
            return self._send(200, {"predictions": [0.1, 0.9], "candidates": "none"})
        if model == "empty":
            return self._send(200, {"candidates": [], "usageMetadata": {}})
        self._send(200, {"candidates": [{"content": {"role": "model", "parts": [{"text": EXPLANATION}]},
                                         "finishReason": "STOP", "index": 0}],
                         "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 20}})

    def _send(self, status: int, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout case)
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), GeminiStub)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def call(stub_url: str, model: str, key: str | None = "test-key"):
    started = time.perf_counter()
    result = explain_prediction(PREDICTION, PNG, api_key=key, model=model, base_url=stub_url, timeout_s=TIMEOUT_S)
    return result, time.perf_counter() - started


def test_success_sends_prediction_and_image(stub_url):
    GeminiStub.requests.clear()
    (text, reason), _ = call(stub_url, "gemini-2.5-flash")
    assert text == EXPLANATION and reason is None
    [sent] = GeminiStub.requests
    assert sent["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert sent["key"] == "test-key"
    parts = sent["body"]["contents"][0]["parts"]
    images = [p["inlineData"] for p in parts if "inlineData" in p]
    assert images and (images[0].get("mimeType") or images[0].get("mime_type")) == "image/png"
    assert base64.b64decode(images[0]["data"]) == PNG
    prompt = " ".join(p.get("text", "") for p in parts)
    assert "PNEUMONIA 83.0%" in prompt and "NORMAL 17.0%" in prompt
    assert "not a diagnosis" in prompt and "Do not state or confirm a diagnosis" in prompt


def test_three_class_prompt_names_the_class_and_the_uncertainty(stub_url):
    GeminiStub.requests.clear()
    prediction = {"predicted_class": "TUBERCULOSIS", "confidence": 0.52, "low_confidence": True,
                  "probabilities": {"NORMAL": 0.08, "PNEUMONIA": 0.40, "TUBERCULOSIS": 0.52},
                  "warnings": ["low_confidence", "outside_validated_population"],
                  "warning_messages": {"low_confidence": "The model is unsure about this image.",
                                       "outside_validated_population": "The image is darker than 99.5% of the "
                                       "X-rays the model was trained and validated on."}}
    text, reason = explain_prediction(prediction, PNG, api_key="test-key", base_url=stub_url, timeout_s=TIMEOUT_S)
    assert text == EXPLANATION and reason is None
    [sent] = GeminiStub.requests
    prompt = " ".join(p.get("text", "") for p in sent["body"]["contents"][0]["parts"])
    assert "predicted class: TUBERCULOSIS, probability 52.0%" in prompt
    assert "NORMAL 8.0%, PNEUMONIA 40.0%, TUBERCULOSIS 52.0%" in prompt
    assert "next most probable class: PNEUMONIA 40.0%" in prompt
    assert "LOW CONFIDENCE" in prompt and "flagged this output as low confidence" in prompt
    # The population warning is named in words, with the answer's own words for how the image differs.
    assert "OUTSIDE VALIDATED POPULATION -- The image is darker than 99.5%" in prompt
    assert "not a diagnosis" in prompt and "Do not state or confirm a diagnosis" in prompt
    # A confident answer is not called uncertain.
    confident = build_prompt({**prediction, "confidence": 0.97, "low_confidence": False, "warnings": []})
    assert "LOW CONFIDENCE" not in confident and "not flagged as low confidence" in confident


@pytest.mark.parametrize("model, words", [
    ("slow", "in time"), ("quota", "quota"), ("broken", "500"), ("garbage", "malformed"),
    ("empty", "no usable text"), ("truncated", "malformed"), ("wrong-shape", "no usable text"),
])
def test_failures_give_none_and_a_reason_within_the_timeout(stub_url, model, words):
    (text, reason), elapsed = call(stub_url, model)
    assert text is None
    assert words in reason
    assert elapsed < GAVE_UP_BY_S


def test_no_key_makes_no_call(stub_url):
    GeminiStub.requests.clear()
    (text, reason), _ = call(stub_url, "gemini-2.5-flash", key="")
    assert text is None and "GEMINI_API_KEY" in reason
    assert GeminiStub.requests == []


# --- through the app ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(tiny_artifacts, stub_url):
    return create_app({"CHESTXRAY_ARTIFACTS": str(tiny_artifacts), "GEMINI_API_KEY": "test-key",
                       "GEMINI_BASE_URL": stub_url, "GEMINI_TIMEOUT_S": TIMEOUT_S})


@pytest.fixture(scope="module")
def xray(fullsize_dir) -> bytes:
    return sorted(fullsize_dir.glob("PNEUMONIA/*.jpeg"))[0].read_bytes()


def explain_via_app(app, xray, model, monkeypatch):
    monkeypatch.setitem(app.config, "GEMINI_MODEL", model)
    started = time.perf_counter()
    response = app.test_client().post("/predict/explain", data={"file": (io.BytesIO(xray), "x.jpeg")})
    return response, time.perf_counter() - started


def test_app_returns_explanation(app, xray, monkeypatch):
    response, _ = explain_via_app(app, xray, "gemini-2.5-flash", monkeypatch)
    body = response.get_json()
    assert response.status_code == 200
    assert body["explanation"] == EXPLANATION and body["explanation_error"] is None
    assert body["predicted_class"] in ("NORMAL", "PNEUMONIA") and body["gradcam_png"]


@pytest.mark.parametrize("model, words", [("slow", "in time"), ("quota", "quota"), ("broken", "500"),
                                          ("garbage", "malformed"), ("empty", "no usable text")])
def test_app_still_predicts_when_gemini_fails(app, xray, monkeypatch, model, words):
    """Slow, rate-limited, failing or garbage Gemini: the prediction and heatmap come back, with the reason."""
    response, elapsed = explain_via_app(app, xray, model, monkeypatch)
    body = response.get_json()
    assert response.status_code == 200
    assert body["explanation"] is None and words in body["explanation_error"]
    assert body["predicted_class"] in ("NORMAL", "PNEUMONIA") and body["gradcam_png"]
    assert elapsed < GAVE_UP_BY_S + 2.0  # + the prediction and Grad-CAM
