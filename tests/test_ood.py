"""The population check ("is it like what the model was validated on?"): the distance, the reference stage's
output, and the app answering with the warning outside_validated_population and its words -- never refusing.

The tests marked "xray detector (lead)" below expect the separate "not a chest X-ray" detector's 422 refusal
(issue #14); they fail until that detector is wired in.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
from helpers import (assert_error, assert_prediction, darkened_png, live_server, photo_png, png_bytes,
                     set_reference_thresholds, upload)

from chestxray.model.artifacts import ModelFiles
from chestxray.model.ood import OOD_FILE, REFERENCE_FILE, OodDetector, OodReferenceError
from chestxray.model.population import OUTSIDE_VALIDATED_POPULATION, PopulationCheck
from chestxray.model.predictor import Predictor
from chestxray.serving import create_app

OUTSIDE = OUTSIDE_VALIDATED_POPULATION
_photo = photo_png

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

def test_distance_is_mahalanobis_under_ledoit_wolf_and_the_threshold_comes_from_validation(tmp_path):
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    train, val = rng.normal(size=(400, 6)) * [1, 2, 3, 1, 1, 5], rng.normal(size=(100, 6))
    detector = OodDetector.fit(train)
    expected = np.sqrt(LedoitWolf().fit(train).mahalanobis(val))
    assert detector.distances(val) == pytest.approx(expected, rel=1e-5)

    distances = detector.distances(val)
    detector.set_threshold(distances, warn_quantile=0.9)
    assert detector.warn == pytest.approx(np.quantile(distances, 0.9))
    assert np.mean([detector.verdict(d) == "warn" for d in distances]) == pytest.approx(0.1, abs=0.011)
    assert [detector.verdict(d) for d in (0.0, detector.warn)] == ["accept", "warn"]
    assert detector.verdict(detector.distances(np.full((1, 6), 1e6))[0]) == "warn"  # however far: never refused
    with pytest.raises(OodReferenceError, match="re-run the reference stage"):
        detector.distances(np.zeros((1, 5)))

    detector.save(tmp_path)
    (tmp_path / OOD_FILE).write_text(json.dumps({"keras_sha256": "abc"}))
    loaded = OodDetector.load(tmp_path, "abc")
    assert loaded.distances(val) == pytest.approx(distances) and loaded.warn == detector.warn
    with pytest.raises(OodReferenceError, match="another model.keras"):
        OodDetector.load(tmp_path, "def")
    assert OodDetector.load(tmp_path / "missing") is None


def test_a_reference_with_the_old_refuse_threshold_still_loads_and_never_refuses(tmp_path):
    """reference.npz files written before the refuse threshold was dropped hold [warn, refuse]: warn is used."""
    rng = np.random.default_rng(1)
    detector = OodDetector.fit(rng.normal(size=(200, 4)))
    np.savez(tmp_path / REFERENCE_FILE, mean=detector.mean, whitening=detector.whitening,
             thresholds=np.array([3.0, 5.0]))
    (tmp_path / OOD_FILE).write_text(json.dumps({"keras_sha256": "abc"}))
    check = PopulationCheck.load(tmp_path, "abc")
    assert check.on and check.detector.warn == 3.0
    assert [check.verdict(d) for d in (2.9, 4.0, 50.0)] == ["accept", "warn", "warn"]
    assert check.warnings(2.9) == {} and list(check.warnings(50.0)) == [OUTSIDE]
    assert not hasattr(check, "refusal")


# --- the reference stage's output -----------------------------------------------------------------

def test_reference_stage_writes_the_threshold_and_exposure_range_chosen_on_reference_xrays(ood_artifacts):
    summary = json.loads((ood_artifacts / "reference" / OOD_FILE).read_text())
    thresholds = summary["thresholds"]
    assert thresholds["chosen_on"] == "validation" and thresholds["warn_quantile"] == 0.99
    assert thresholds["warn_distance"] > 0 and "refuse_distance" not in thresholds
    assert summary["n_train_images"] == 32 and summary["n_val_images"] == 16 and summary["feature_dim"] == 728
    validation = summary["validation"]
    # The 99% quantile of 16 distances lies between the two largest: only the farthest is warned about.
    assert validation["n"] == 16 and validation["warned"] == 1 and "refused" not in validation
    assert validation["distance"]["max"] >= thresholds["warn_distance"] > validation["distance"]["p90"]
    exposure = summary["exposure"]
    assert exposure["tail"] == 0.005
    drift = summary["drift_reference"]
    for name in ("intensity_mean", "intensity_std"):  # around the reference X-rays' own mean
        assert exposure[name]["low"] < drift[name]["mean"] < exposure[name]["high"]
    assert drift["intensity_mean"]["n"] == 48 and drift["confidence"]["n"] == 16
    assert sum(drift["class_mix"].values()) == 16
    assert "non_xrays" not in summary and not (ood_artifacts / "reference" / "non_xrays.csv").exists()
    with np.load(ood_artifacts / "reference" / REFERENCE_FILE) as arrays:
        assert {"mean", "whitening", "thresholds", "hist_intensity_mean", "hist_ood_distance",
                "edges_ood_distance"} <= set(arrays.files)
        assert arrays["hist_intensity_mean"].sum() == 48 and arrays["hist_ood_distance"].sum() == 16
        assert list(arrays["thresholds"]) == pytest.approx([thresholds["warn_distance"]], abs=1e-3)


# --- the app ----------------------------------------------------------------------------------------

def test_model_info_says_the_population_check_is_on_and_never_refuses(client, ood_artifacts):
    info = client.get("/model/info").get_json()
    check = info["population_check"]
    summary = json.loads((ood_artifacts / "reference" / OOD_FILE).read_text())
    assert check["enabled"] is True and check["chosen_on"] == "validation" and check["refuses"] is False
    assert check["warning"] == OUTSIDE and "refuse_distance" not in check
    assert check["warn_distance"] == pytest.approx(summary["thresholds"]["warn_distance"], abs=1e-3)
    assert check["exposure_ranges"]["intensity_mean"] == summary["exposure"]["intensity_mean"]
    assert "not_a_chest_xray_check" in info  # the separate detector's entry (issue #14)


def test_training_hospital_xrays_get_a_plain_answer(client, kermany224):
    """X-rays from the training hospital, not among the reference's images: answered with no population warning."""
    warn = client.get("/model/info").get_json()["population_check"]["warn_distance"]
    for path in [p for label in ("NORMAL", "PNEUMONIA") for p in sorted((kermany224 / "train" / label).glob("*.jpeg"))
                 [100:104]]:
        body = client.post("/predict", data=upload(path.read_bytes())).get_json()
        assert_prediction(body)
        assert 0 < body["ood_distance"] < warn, path.name
        assert OUTSIDE not in body["warnings"] and OUTSIDE not in body["warning_messages"]


def test_adult_films_against_the_pediatric_model_are_answered_with_the_population_warning(client, tb256):
    """Adult chest films (another hospital) sent to a model validated on children only: chest X-rays, so the
    detector lets them through, but outside the validated population, so the answer says so in words."""
    # Not among the test detector's training films. Chosen, among the last 24 adult normals, as films both checks
    # place clearly (one run: distance 60.6, 62.5, 70.4 against a warn distance of 52.0; P(chest X-ray) 0.99,
    # 0.94, 0.92): the 12-epoch test detector is not bit-reproducible on CPU, and films near its threshold
    # (Normal-9940 at 0.51) were refused in some runs. How often real adult films are refused is the
    # xray_check stage's leave-one-source-out measurement, not this test's question.
    for name in ("Normal-9908.png", "Normal-9924.png", "Normal-9997.png"):
        response = client.post("/predict", data=upload((tb256 / "NORMAL" / name).read_bytes()))
        assert response.status_code == 200, (name, response.get_json())
        body = response.get_json()
        assert_prediction(body)
        assert OUTSIDE in body["warnings"], (name, body["ood_distance"])
        assert "validated" in body["warning_messages"][OUTSIDE] and body["xray_score"] is not None


def test_beyond_warn_the_answer_carries_the_warning_and_its_words(client, ood_artifacts, xrays, tmp_path):
    """The threshold moved just below a real X-ray's distance: answered 200, with the warning and its words."""
    root = _copy(ood_artifacts, tmp_path)
    data = xrays[0].read_bytes()
    distance = client.post("/predict", data=upload(data)).get_json()["ood_distance"]
    set_reference_thresholds(root, [distance * 0.9])
    client = create_app({"CHESTXRAY_ARTIFACTS": str(root)}).test_client()
    response = client.post("/predict", data=upload(data))
    assert response.status_code == 200
    body = response.get_json()
    assert_prediction(body)
    assert OUTSIDE in body["warnings"] and "not_a_chest_xray" not in body["warnings"]
    words = body["warning_messages"][OUTSIDE]
    assert "farther from the X-rays the model was validated on than those of 99% of validation X-rays" in words
    assert "may be less reliable" in words and f"{distance:.1f}" in words
    assert "pediatric" not in words and "lateral" not in words  # not computed, so not claimed
    assert body["ood_distance"] == pytest.approx(distance, rel=1e-4)
    batch = client.post("/predict/batch", data={"files": [(io.BytesIO(data), "a.jpeg")]}).get_json()
    assert batch["results"][0]["warning_messages"] == body["warning_messages"]


def test_between_the_old_thresholds_an_xray_is_answered_with_the_warning(client, ood_artifacts, xrays, tmp_path):
    """A reference in the old layout ([warn, refuse]): an X-ray between the two is served with the new warning."""
    root = _copy(ood_artifacts, tmp_path)
    data = xrays[1].read_bytes()
    distance = client.post("/predict", data=upload(data)).get_json()["ood_distance"]
    set_reference_thresholds(root, [distance * 0.9, distance * 1.1], legacy=True)
    client = create_app({"CHESTXRAY_ARTIFACTS": str(root)}).test_client()
    body = client.post("/predict", data=upload(data)).get_json()
    assert_prediction(body)
    assert body["warnings"][-1] == OUTSIDE and "may be less reliable" in body["warning_messages"][OUTSIDE]
    assert "darker" not in body["warning_messages"][OUTSIDE]  # an old reference has no exposure range to compare


def test_the_warning_says_when_the_exposure_is_unusual(ood_artifacts, xrays, tmp_path):
    """With every image warned about, only the under-exposed film is called darker than the reference X-rays."""
    root = _copy(ood_artifacts, tmp_path)
    set_reference_thresholds(root, [0.0])
    client = create_app({"CHESTXRAY_ARTIFACTS": str(root)}).test_client()
    plain = client.post("/predict", data=upload(xrays[0].read_bytes())).get_json()["warning_messages"][OUTSIDE]
    dark = client.post("/predict", data=upload(darkened_png(xrays[0].read_bytes(), 0.3), "dark.png")
                       ).get_json()["warning_messages"][OUTSIDE]
    assert "darker" not in plain and "contrast" not in plain
    assert dark.startswith("The image is darker")
    assert "than 99.5% of the X-rays the model was trained and validated on" in dark
    low = json.loads((root / "reference" / OOD_FILE).read_text())["exposure"]["intensity_mean"]["low"]
    assert f"against {low:.0f} to" in dark


@pytest.mark.parametrize("kind", ["photo", "noise", "blank"])
def test_the_population_check_alone_never_refuses(ood_artifacts, kind):
    """However far an image lies (a photo, noise, a blank), the population check warns and the prediction stands.

    Through the Predictor with no "not a chest X-ray" detector: refusing non-X-rays is that detector's job.
    """
    no_detector = replace(ModelFiles.from_artifacts(ood_artifacts), xray_check_dir=None)
    predictor = Predictor.load(no_detector, backend="keras")
    assert not predictor.xray_check.on and "dvc repro xray_check" in predictor.xray_check.off_reason
    [result] = predictor.predict_images([NON_XRAYS[kind]()])
    assert result.error is None and result.prediction is not None
    prediction = result.prediction
    assert prediction.warnings[-1] == OUTSIDE and prediction.verdict == "warn"
    assert prediction.ood_distance > predictor.population_check.detector.warn
    assert "may be less reliable" in prediction.warning_messages[OUTSIDE]


def test_without_a_reference_the_check_is_off(tiny_artifacts, xrays):
    client = create_app({"CHESTXRAY_ARTIFACTS": str(tiny_artifacts)}).test_client()
    check = client.get("/model/info").get_json()["population_check"]
    assert check["enabled"] is False and "dvc repro reference" in check["reason"]
    body = client.post("/predict", data=upload(xrays[0].read_bytes())).get_json()  # classified, as before
    assert body["ood_distance"] is None and OUTSIDE not in body["warnings"] and OUTSIDE not in body["warning_messages"]


def test_a_reference_of_another_model_is_not_used(ood_artifacts, tmp_path):
    root = _copy(ood_artifacts, tmp_path)
    summary = json.loads((root / "reference" / OOD_FILE).read_text())
    (root / "reference" / OOD_FILE).write_text(json.dumps({**summary, "keras_sha256": "0" * 64}))
    check = create_app({"CHESTXRAY_ARTIFACTS": str(root)}).test_client().get("/model/info").get_json()
    assert check["population_check"]["enabled"] is False
    assert "another model.keras" in check["population_check"]["reason"]


def test_cli_writes_the_population_warning_in_words(ood_artifacts, xrays, tmp_path):
    """The batch CSV carries the warning code and its words ("code: words"); a plain answer has neither."""
    from chestxray.cli import main

    root = _copy(ood_artifacts, tmp_path / "artifacts")
    clf = Predictor.from_artifacts(root, backend="keras")
    distances = [clf.predict_images([p])[0].prediction.ood_distance for p in xrays[:2]]
    set_reference_thresholds(root, [(min(distances) + max(distances)) / 2])  # the nearer one passes
    out = tmp_path / "results.csv"
    assert main(["predict", str(xrays[0]), str(xrays[1]), "--out", str(out), "--artifacts", str(root)]) == 0
    with open(out, newline="") as fh:
        rows = {Path(r["file"]).name: r for r in csv.DictReader(fh)}
    far, near = (rows[xrays[i].name] for i in sorted((0, 1), key=lambda i: -distances[i]))
    assert OUTSIDE in far["warnings"].split(";") and far["error"] == ""
    assert far["warning_messages"].startswith(f"{OUTSIDE}: This image's features lie farther")
    assert OUTSIDE not in near["warnings"] and OUTSIDE not in near["warning_messages"]


# --- the "not a chest X-ray" refusal: tests for the separate detector (issue #14, lead) ---------------

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
