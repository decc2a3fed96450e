"""The "not a chest X-ray" check: the detector, the reference stage's output, and the app refusing or flagging."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import assert_error, assert_prediction, live_server, png_bytes, upload

from chestxray.model.ood import OOD_FILE, REFERENCE_FILE, OodDetector, OodReferenceError
from chestxray.serving import create_app


def _photo() -> bytes:
    """scikit-learn's sample photo of a Chinese temple, as a PNG upload."""
    from sklearn.datasets import load_sample_image

    return png_bytes(load_sample_image("china.jpg")[..., ::-1])  # RGB -> BGR for OpenCV


NON_XRAYS = {
    "photo": _photo,
    "noise": lambda: png_bytes(np.random.default_rng(0).integers(0, 256, (512, 512), dtype=np.uint8)),
    "blank": lambda: png_bytes(np.zeros((512, 512), np.uint8)),
}


@pytest.fixture(scope="module")
def app(ood_artifacts):
    """The app on the model with a reference (conftest.py's `client` and `xrays` fixtures run against it)."""
    return create_app({"CHESTXRAY_ARTIFACTS": str(ood_artifacts), "GEMINI_API_KEY": ""})


def _copy(root: Path, dest: Path) -> Path:
    for part in ("training", "evaluation", "reference"):
        shutil.copytree(root / part, dest / part)
    return dest


# --- the detector ---------------------------------------------------------------------------------

def test_distance_is_mahalanobis_under_ledoit_wolf_and_thresholds_come_from_validation(tmp_path):
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(400, 6)) * [1, 2, 3, 1, 1, 5], rng.normal(size=(100, 6))
    detector = OodDetector.fit(train)
    expected = np.sqrt(LedoitWolf().fit(train).mahalanobis(val))
    assert detector.distances(val) == pytest.approx(expected, rel=1e-5)

    distances = detector.distances(val)
    detector.set_thresholds(distances, warn_quantile=0.9, refuse_quantile=1.0, refuse_margin=1.5)
    assert detector.warn == pytest.approx(np.quantile(distances, 0.9))
    assert detector.refuse == pytest.approx(distances.max() * 1.5)
    assert [detector.verdict(d) for d in (0.0, detector.warn, detector.refuse)] == ["accept", "warn", "refuse"]
    assert detector.verdict(detector.distances(np.full((1, 6), 40.0))[0]) == "refuse"
    with pytest.raises(OodReferenceError, match="re-run the reference stage"):
        detector.distances(np.zeros((1, 5)))

    detector.save(tmp_path)
    (tmp_path / OOD_FILE).write_text(json.dumps({"keras_sha256": "abc"}))
    loaded = OodDetector.load(tmp_path, "abc")
    assert loaded.distances(val) == pytest.approx(distances) and loaded.refuse == detector.refuse
    with pytest.raises(OodReferenceError, match="another model.keras"):
        OodDetector.load(tmp_path, "def")
    assert OodDetector.load(tmp_path / "missing") is None


# --- the reference stage's output -----------------------------------------------------------------

def test_reference_stage_writes_thresholds_chosen_on_validation(ood_artifacts):
    summary = json.loads((ood_artifacts / "reference" / OOD_FILE).read_text())
    thresholds = summary["thresholds"]
    assert thresholds["chosen_on"] == "validation"
    assert 0 < thresholds["warn_distance"] < thresholds["refuse_distance"]
    assert summary["n_train_images"] == 32 and summary["n_val_images"] == 16 and summary["feature_dim"] == 728
    validation = summary["validation"]
    assert validation["n"] == 16 and validation["refused"] == 0  # refuse is above every validation X-ray
    assert validation["distance"]["max"] * 1.2 == pytest.approx(thresholds["refuse_distance"], rel=1e-3)
    drift = summary["drift_reference"]
    assert drift["intensity_mean"]["n"] == 48 and drift["confidence"]["n"] == 16
    assert sum(drift["class_mix"].values()) == 16
    with np.load(ood_artifacts / "reference" / REFERENCE_FILE) as arrays:
        assert {"mean", "whitening", "thresholds", "hist_intensity_mean", "hist_ood_distance"} <= set(arrays.files)
        assert arrays["hist_intensity_mean"].sum() == 48


# --- the app ----------------------------------------------------------------------------------------

def test_model_info_says_the_check_is_on(client, ood_artifacts):
    check = client.get("/model/info").get_json()["not_a_chest_xray_check"]
    thresholds = json.loads((ood_artifacts / "reference" / OOD_FILE).read_text())["thresholds"]
    assert check["enabled"] is True and check["chosen_on"] == "validation"
    assert check["warn_distance"] == pytest.approx(thresholds["warn_distance"], abs=1e-3)
    assert check["refuse_distance"] == pytest.approx(thresholds["refuse_distance"], abs=1e-3)


def test_real_xrays_are_accepted(client, xrays):
    """The 16 full-size originals (not used for the reference) are classified, not refused."""
    refuse = client.get("/model/info").get_json()["not_a_chest_xray_check"]["refuse_distance"]
    for path in xrays:
        response = client.post("/predict", data=upload(path.read_bytes()))
        assert response.status_code == 200, (path.name, response.get_json())
        body = response.get_json()
        assert_prediction(body)
        assert 0 < body["ood_distance"] < refuse


@pytest.mark.parametrize("endpoint", ["/predict", "/predict/explain"])
@pytest.mark.parametrize("kind", list(NON_XRAYS))
def test_non_xrays_are_refused(client, endpoint, kind):
    body = assert_error(client.post(endpoint, data=upload(NON_XRAYS[kind](), "image.png")), 422, "not_a_chest_xray")
    assert "does not look like a chest X-ray" in body["message"] and "upload a frontal chest X-ray" in body["message"]
    assert "predicted_class" not in body and "gradcam_png" not in body


def test_batch_refuses_only_the_photo(client, xrays):
    files = [(io.BytesIO(xrays[0].read_bytes()), "a.jpeg"), (io.BytesIO(_photo()), "b.png"),
             (io.BytesIO(xrays[1].read_bytes()), "c.jpeg")]
    body = client.post("/predict/batch", data={"files": files}).get_json()
    assert body["count"] == 3 and body["errors"] == 1
    assert [r["index"] for r in body["results"]] == [0, 1, 2]
    assert_prediction(body["results"][0])
    assert_prediction(body["results"][2])
    assert body["results"][1]["error"] == "not_a_chest_xray" and body["results"][1]["message"]


def test_photo_refused_over_http(app):
    with live_server(app) as url:
        response = requests.post(url + "/predict", files={"file": ("photo.png", _photo(), "image/png")}, timeout=30)
    assert response.status_code == 422
    assert response.json()["error"] == "not_a_chest_xray"


def test_between_the_thresholds_the_answer_carries_a_warning(client, ood_artifacts, xrays, tmp_path):
    """Thresholds moved so that one real X-ray falls between warn and refuse: served, with the warning."""
    root = _copy(ood_artifacts, tmp_path)
    data = xrays[0].read_bytes()
    distance = client.post("/predict", data=upload(data)).get_json()["ood_distance"]
    path = root / "reference" / REFERENCE_FILE
    with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    arrays["thresholds"] = np.array([distance * 0.9, distance * 1.1])
    np.savez(path, **arrays)
    client = create_app({"CHESTXRAY_ARTIFACTS": str(root)}).test_client()
    body = client.post("/predict", data=upload(data)).get_json()
    assert_prediction(body)
    assert "not_a_chest_xray" in body["warnings"]
    assert body["ood_distance"] == pytest.approx(distance, rel=1e-4)
    far = client.post("/predict", data=upload(_photo(), "photo.png"))
    assert_error(far, 422, "not_a_chest_xray")


def test_without_a_reference_the_check_is_off(tiny_artifacts):
    client = create_app({"CHESTXRAY_ARTIFACTS": str(tiny_artifacts)}).test_client()
    check = client.get("/model/info").get_json()["not_a_chest_xray_check"]
    assert check["enabled"] is False and "dvc repro reference" in check["reason"]
    body = client.post("/predict", data=upload(_photo(), "photo.png")).get_json()  # classified, as before
    assert body["ood_distance"] is None and "not_a_chest_xray" not in body["warnings"]


def test_a_reference_of_another_model_is_not_used(ood_artifacts, tmp_path):
    root = _copy(ood_artifacts, tmp_path)
    summary = json.loads((root / "reference" / OOD_FILE).read_text())
    (root / "reference" / OOD_FILE).write_text(json.dumps({**summary, "keras_sha256": "0" * 64}))
    check = create_app({"CHESTXRAY_ARTIFACTS": str(root)}).test_client().get("/model/info").get_json()
    assert check["not_a_chest_xray_check"]["enabled"] is False
    assert "another model.keras" in check["not_a_chest_xray_check"]["reason"]


def test_cli_does_not_classify_a_photo(ood_artifacts, xrays, tmp_path):
    from chestxray.cli import main

    (tmp_path / "photo.png").write_bytes(_photo())
    out = tmp_path / "results.csv"
    assert main(["predict", str(xrays[0]), str(tmp_path / "photo.png"), "--out", str(out),
                 "--artifacts", str(ood_artifacts)]) == 0
    with open(out, newline="") as fh:
        xray_row, photo_row = list(csv.DictReader(fh))
    assert xray_row["predicted_class"] in ("NORMAL", "PNEUMONIA") and float(xray_row["ood_distance"]) > 0
    assert photo_row["predicted_class"] == "" and "does not look like a chest X-ray" in photo_row["error"]
