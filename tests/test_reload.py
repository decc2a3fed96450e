"""Model missing or corrupt at start-up, and POST /admin/reload.

The swap is atomic, one reload runs at a time, and a failed reload keeps the old model serving.
"""
from __future__ import annotations

import io
import shutil
import threading

import pytest
import requests
from helpers import ADMIN_KEY, API_KEYS, USER_KEY, assert_error, assert_prediction, live_server

from chestxray.serving import admin, create_app

ADMIN, USER = {"X-API-Key": ADMIN_KEY}, {"X-API-Key": USER_KEY}


@pytest.fixture(scope="module")
def xray(fullsize_dir) -> bytes:
    return sorted(fullsize_dir.glob("PNEUMONIA/*.jpeg"))[0].read_bytes()


def make_app(artifacts) -> object:
    return create_app({"CHESTXRAY_ARTIFACTS": str(artifacts), "GEMINI_API_KEY": "", "CHESTXRAY_API_KEYS": API_KEYS,
                       "CHESTXRAY_RATE_LIMIT_PER_MIN": 0})


def predict(client, xray: bytes):
    return client.post("/predict", data={"file": (io.BytesIO(xray), "x.jpeg")}, headers=USER)


def corrupt_copy(tiny_artifacts, where):
    """The tiny artifacts with model.keras replaced by garbage of the same size."""
    shutil.copytree(tiny_artifacts, where)
    model = where / "training" / "model.keras"
    model.write_bytes(b"PK\x03\x04 this is not a keras archive" + bytes(model.stat().st_size))
    return where


def test_a_model_that_cannot_predict_is_reported_at_start_in_one_line(tiny_artifacts, tmp_path, xray):
    """With the warm-up (the default), a model whose saved input size disagrees with model_info.json is
    'unavailable' from the start, with the innermost error only: no traced file paths."""
    import json

    root = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, root)
    info_file = root / "training" / "model_info.json"
    info_file.write_text(json.dumps({**json.loads(info_file.read_text()), "image_size": 64}))  # the model takes 96
    app = create_app({"CHESTXRAY_ARTIFACTS": str(root), "GEMINI_API_KEY": "", "CHESTXRAY_WARM_UP": "1"})
    health = app.test_client().get("/health")
    message = health.get_json()["message"]
    assert health.status_code == 503 and message.startswith("the model failed a test prediction (ValueError: ")
    assert "(None, 96, 96, 3)" in message and "\n" not in message and ".py" not in message
    assert_error(predict(app.test_client(), xray), 503, "model_unavailable")
    unwarmed = create_app({"CHESTXRAY_ARTIFACTS": str(root), "GEMINI_API_KEY": "", "CHESTXRAY_WARM_UP": "0"})
    assert unwarmed.test_client().get("/health").status_code == 200  # loaded; it would fail at the first request


def test_missing_model_then_reload_makes_it_ready(tiny_artifacts, tmp_path, xray):
    artifacts = tmp_path / "artifacts"
    client = make_app(artifacts).test_client()
    health = client.get("/health")
    assert health.status_code == 503 and "no trained model" in health.get_json()["message"]
    assert_error(predict(client, xray), 503, "model_unavailable")

    failed = assert_error(client.post("/admin/reload", headers=ADMIN), 503, "reload_failed")
    assert "no trained model" in failed["message"]

    shutil.copytree(tiny_artifacts, artifacts)  # the pipeline (or an operator) puts the model in place
    reloaded = client.post("/admin/reload", headers=ADMIN)
    assert reloaded.status_code == 200, reloaded.get_json()
    assert reloaded.get_json()["previous_model_version"] is None
    assert client.get("/health").get_json()["status"] == "ready"
    response = predict(client, xray)
    assert response.status_code == 200
    assert_prediction(response.get_json())
    assert response.get_json()["model_version"] == reloaded.get_json()["model_version"]


def test_corrupt_model_at_start_up_serves_503_with_the_reason(tiny_artifacts, tmp_path, xray):
    client = make_app(corrupt_copy(tiny_artifacts, tmp_path / "artifacts")).test_client()
    health = client.get("/health")
    assert health.status_code == 503
    assert "could not load the model" in health.get_json()["message"]
    assert_error(predict(client, xray), 503, "model_unavailable")
    assert client.get("/").status_code == 200  # the page says so too, rather than failing


def test_failed_reload_keeps_serving_the_old_model(tiny_artifacts, tmp_path, xray):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, artifacts)
    app = make_app(artifacts)
    client = app.test_client()
    version = client.get("/health").get_json()["model_version"]
    shutil.rmtree(artifacts)
    corrupt_copy(tiny_artifacts, artifacts)  # a bad model replaces the good one on disk

    body = assert_error(client.post("/admin/reload", headers=ADMIN), 503, "reload_failed")
    assert "could not load the model" in body["message"] and version in body["message"]
    assert client.get("/health").get_json() == {"status": "ready", "model_version": version, "backend": "keras"}
    assert predict(client, xray).get_json()["model_version"] == version


def test_one_reload_at_a_time(tmp_path):
    client = make_app(tmp_path / "no-model-yet").test_client()
    with admin.RELOAD_LOCK:  # as if another reload were running
        assert_error(client.post("/admin/reload", headers=ADMIN), 409, "reload_in_progress")
    assert_error(client.post("/admin/reload", headers=ADMIN), 503, "reload_failed")  # free again: it ran


@pytest.mark.slow
def test_requests_during_reloads_all_get_a_whole_model(tiny_artifacts, xray):
    """Clients keep predicting over HTTP while the model is swapped twice: every answer is a 200 from one model."""
    app = make_app(tiny_artifacts)
    stop = threading.Event()
    answers: list[tuple[int, str | None]] = []

    def client(url: str) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(f"{url}/predict", files={"file": ("x.jpeg", xray, "image/jpeg")}, headers=USER,
                                 timeout=60)
                answers.append((r.status_code, r.json().get("model_version")))

    with live_server(app) as url:
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            reloads = [requests.post(f"{url}/admin/reload", headers=ADMIN, timeout=300) for _ in range(2)]
        finally:
            stop.set()
            for t in threads:
                t.join()
    assert [r.status_code for r in reloads] == [200, 200]
    versions = {r.json()["model_version"] for r in reloads} | {r.json()["previous_model_version"] for r in reloads}
    assert len(answers) >= 3
    assert {status for status, _ in answers} == {200}, answers
    assert {version for _, version in answers} <= versions
