"""Drift monitoring (/monitoring) and Prometheus metrics (/metrics) through the real app."""
from __future__ import annotations

import io
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import ADMIN_KEY, API_KEYS, USER_KEY, png_bytes
from prometheus_client.parser import text_string_to_metric_families

from chestxray.evaluation import drift
from chestxray.model.predictor import Prediction
from chestxray.serving import create_app
from chestxray.serving.monitoring import Monitor

MIN_COUNT = 20


def _client(artifacts: Path, **settings):
    """A test client of an app with API keys, sending the admin key (/monitoring is admin-only)."""
    app = create_app({"CHESTXRAY_ARTIFACTS": str(artifacts), "GEMINI_API_KEY": "", "CHESTXRAY_API_KEYS": API_KEYS,
                      "CHESTXRAY_RATE_LIMIT_PER_MIN": 0, "CHESTXRAY_DRIFT_MIN_COUNT": MIN_COUNT, **settings})
    client = app.test_client()
    client.environ_base["HTTP_X_API_KEY"] = ADMIN_KEY
    return client


@pytest.fixture(scope="module")
def xrays(kermany224) -> list[bytes]:
    """20 real X-rays from the same distribution as the reference, but not among its images."""
    return [p.read_bytes() for label in ("NORMAL", "PNEUMONIA")
            for p in sorted((kermany224 / "train" / label).glob("*.jpeg"))[100:110]]


def _darkened(data: bytes) -> bytes:
    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    return png_bytes((gray * 0.4).astype(np.uint8))


def _send(client, images: list[bytes]) -> None:
    """All images through /predict/batch, 10 at a time."""
    for start in range(0, len(images), 10):
        files = [(io.BytesIO(data), f"{i}.png") for i, data in enumerate(images[start:start + 10])]
        assert client.post("/predict/batch", data={"files": files}).status_code == 200


def _metrics(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.get_data(as_text=True)) for sample in family.samples}


def test_xrays_do_not_drift(ood_artifacts, xrays):
    client = _client(ood_artifacts)
    before = client.get("/monitoring").get_json()
    assert before["images"] == 0 and before["drift"]["status"] == "collecting" and before["drift"]["flag"] is None
    _send(client, xrays)
    body = client.get("/monitoring").get_json()
    assert body["images"] == MIN_COUNT
    assert body["drift"]["status"] == "ok" and body["drift"]["flag"] is False, body["drift"]
    assert body["outcomes"]["refused"] == 0
    mean = body["signals"]["intensity_mean"]
    assert mean["live"]["n"] == MIN_COUNT and mean["reference"]["n"] == 48
    assert mean["compared"] is True and mean["ks_distance"] <= mean["limit"]
    assert body["signals"]["image_side"]["compared"] is False  # the training copies are all 224 px
    assert sum(body["class_mix"]["live"].values()) == MIN_COUNT


def test_darkened_xrays_drift_and_say_why(ood_artifacts, xrays):
    client = _client(ood_artifacts)
    _send(client, [_darkened(x) for x in xrays[: MIN_COUNT // 2]])
    assert client.get("/monitoring").get_json()["drift"]["status"] == "collecting"
    _send(client, [_darkened(x) for x in xrays[MIN_COUNT // 2:]])
    body = client.get("/monitoring").get_json()
    assert body["images"] == MIN_COUNT
    assert body["drift"]["status"] == "drift" and body["drift"]["flag"] is True
    assert any(reason.startswith("intensity_mean") for reason in body["drift"]["reasons"]), body["drift"]
    intensity = body["signals"]["intensity_mean"]
    assert intensity["live"]["mean"] < 0.5 * intensity["reference"]["mean"]
    assert _metrics(client)[("chestxray_drift", ())] == 1.0


def test_metrics_count_requests_predictions_and_refusals(ood_artifacts, xrays):
    from sklearn.datasets import load_sample_image

    client = _client(ood_artifacts)
    for data in xrays[:3]:
        assert client.post("/predict", data={"file": (io.BytesIO(data), "x.jpeg")}).status_code == 200
    photo = png_bytes(load_sample_image("flower.jpg")[..., ::-1])
    assert client.post("/predict", data={"file": (io.BytesIO(photo), "p.png")}).status_code == 422
    assert client.post("/predict", data={"file": (io.BytesIO(b""), "e.png")}).status_code == 400
    client.get("/health")
    client.get("/no/such/page")
    samples = _metrics(client)

    def requests(endpoint: str, status: str, method: str = "POST") -> float:
        key = ("chestxray_http_requests_total", (("endpoint", endpoint), ("method", method), ("status", status)))
        return samples.get(key, 0.0)

    assert requests("/predict", "200") == 3 and requests("/predict", "422") == 1 and requests("/predict", "400") == 1
    assert requests("/health", "200", "GET") == 1 and requests("unmatched", "404", "GET") == 1
    latency = ("chestxray_http_request_duration_seconds_count", (("endpoint", "/predict"),))
    assert samples[latency] == 5
    predicted = sum(v for (name, _), v in samples.items() if name == "chestxray_predictions_total")
    assert predicted == 3  # the refused photo is not a prediction
    assert samples[("chestxray_not_a_chest_xray_total", (("outcome", "refused"),))] == 1
    assert samples[("chestxray_drift", ())] == 0.0
    assert client.get("/monitoring").get_json()["outcomes"] == {"accepted": 3, "warned": 0, "refused": 1}


def test_population_warnings_are_counted_as_answers_not_refusals(ood_artifacts, xrays, tmp_path):
    """The warn threshold moved above the nearest of four X-rays: three are answered with the warning, and
    counted so (Prometheus and /monitoring); nothing is counted as refused."""
    import shutil

    from helpers import set_reference_thresholds

    root = tmp_path / "artifacts"
    for part in ("training", "evaluation", "reference"):
        shutil.copytree(ood_artifacts / part, root / part)
    def form(data: bytes) -> dict:
        return {"file": (io.BytesIO(data), "x.jpeg")}

    before = _client(root)
    distances = [before.post("/predict", data=form(x)).get_json()["ood_distance"] for x in xrays[:4]]
    set_reference_thresholds(root, [min(distances) * 1.0001])
    client = _client(root)
    answers = [client.post("/predict", data=form(x)) for x in xrays[:4]]
    assert [r.status_code for r in answers] == [200] * 4
    assert sum("outside_validated_population" in r.get_json()["warnings"] for r in answers) == 3
    samples = _metrics(client)
    assert samples[("chestxray_outside_validated_population_total", ())] == 3
    assert sum(v for (name, _), v in samples.items() if name == "chestxray_predictions_total") == 4
    assert samples[("chestxray_not_a_chest_xray_total", (("outcome", "refused"),))] == 0
    assert client.get("/monitoring").get_json()["outcomes"] == {"accepted": 1, "warned": 3, "refused": 0}


def test_apps_do_not_share_metrics(tiny_artifacts):
    first, second = (_client(tiny_artifacts) for _ in range(2))
    first.get("/health")
    first.get("/health")
    second.get("/health")
    key = ("chestxray_http_requests_total", (("endpoint", "/health"), ("method", "GET"), ("status", "200")))
    assert _metrics(first)[key] == 2 and _metrics(second)[key] == 1
    body = second.get("/monitoring").get_json()  # no reference next to the tiny model: counted, not compared
    assert body["drift"]["status"] == "no_reference" and "reference" in body["drift"]["message"]


def test_monitor_counts_from_many_threads_without_loss():
    monitor = Monitor(None, min_count=10)
    batch = np.full((2, 8, 8, 3), 100.0, np.float32)
    prediction = Prediction("NORMAL", 0.9, {"NORMAL": 0.9, "PNEUMONIA": 0.1}, False)

    def work():
        for _ in range(250):
            monitor.observe(batch, [512, 512], [prediction, prediction], [None, None])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    body = monitor.snapshot()
    assert body["images"] == 2000 and body["class_mix"]["live"] == {"NORMAL": 2000}
    assert body["signals"][drift.INTENSITY_MEAN.name]["live"] == {"n": 2000, "mean": 100.0, "std": 0.0}
    assert body["drift"]["status"] == "no_reference"


def test_monitoring_needs_an_admin_key(tiny_artifacts):
    app = create_app({"CHESTXRAY_ARTIFACTS": str(tiny_artifacts), "GEMINI_API_KEY": "", "CHESTXRAY_API_KEYS": API_KEYS})
    client = app.test_client()
    assert client.get("/monitoring").status_code == 401
    assert client.get("/monitoring", headers={"X-API-Key": USER_KEY}).status_code == 403
    assert client.get("/metrics").status_code == 200  # counts only, for the Prometheus scraper


def test_reload_restarts_the_monitor_against_the_new_model(tiny_artifacts, xrays):
    client = _client(tiny_artifacts)
    _send(client, xrays[:10])
    assert client.get("/monitoring").get_json()["images"] == 10
    assert client.post("/admin/reload").status_code == 200
    assert client.get("/monitoring").get_json()["images"] == 0
