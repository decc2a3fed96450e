"""Robustness: test-time augmentation views, the corruptions, and the robustness stage on a tiny model."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from chestxray.data.split import stratified_subset
from chestxray.evaluation.corruptions import CORRUPTIONS, corrupt
from chestxray.model.predictor import Predictor
from chestxray.model.tta import shift, tta_probabilities, tta_views
from chestxray.pipeline import robustness as stage
from helpers import copy_model, real_test_data

# --- test-time augmentation -----------------------------------------------------------------------


def test_tta_views_are_the_original_a_mirror_and_two_small_shifts():
    rng = np.random.default_rng(0)
    batch = rng.uniform(1, 255, (2, 50, 50, 3)).astype(np.float32)
    views = tta_views(batch)
    assert len(views) == 4 and all(v.shape == batch.shape and v.dtype == batch.dtype for v in views)
    original, flipped, down_right, up_left = views
    assert np.array_equal(original, batch)
    assert np.array_equal(flipped[:, :, 0], batch[:, :, -1])  # left column <- right column: a horizontal flip
    assert np.array_equal(flipped[:, 0, :], batch[:, 0, ::-1])  # rows stay where they are (never upside down)
    # 4% of 50 px = 2 px: content moves by 2 in y and x; the uncovered border is black, as in training.
    assert np.array_equal(down_right[:, 2:, 2:], batch[:, :-2, :-2]) and (down_right[:, :2] == 0).all()
    assert np.array_equal(up_left[:, :-2, :-2], batch[:, 2:, 2:]) and (up_left[:, :, -2:] == 0).all()


def test_shift_by_zero_is_identity():
    batch = np.arange(2 * 5 * 5 * 3, dtype=np.float32).reshape(2, 5, 5, 3)
    assert np.array_equal(shift(batch, 0, 0), batch)


def test_tta_probabilities_average_over_the_views():
    batch = np.random.default_rng(1).uniform(0, 255, (3, 20, 20, 3)).astype(np.float32)

    def left_half_brightness(x: np.ndarray) -> np.ndarray:  # differs between a view and its mirror
        p = x[:, :, :10].mean(axis=(1, 2, 3)) / 255
        return np.stack([1 - p, p], axis=1)

    expected = np.mean([left_half_brightness(v) for v in tta_views(batch)], axis=0)
    assert np.allclose(tta_probabilities(left_half_brightness, batch), expected)
    assert not np.allclose(expected, left_half_brightness(batch))


def test_classifier_tta_averages_the_views_then_applies_the_temperature_on_both_backends(varying_exported,
                                                                                          kermany224):
    from chestxray.evaluation.calibration import apply_temperature

    paths = sorted((kermany224 / "test").glob("*/*.jpeg"))[::150]
    served = {}
    for backend in ("onnx", "keras"):
        clf = Predictor.from_artifacts(varying_exported, backend=backend, tta=True)
        assert clf.backend == backend and clf.calibration.temperature == 1.5
        x = np.stack([clf.prepare(p.read_bytes()) for p in paths])
        expected = apply_temperature(np.mean([clf.raw_probabilities(v) for v in tta_views(x)], axis=0), 1.5)
        served[backend] = clf.served_probabilities(x)
        assert np.allclose(served[backend], expected, atol=1e-6)
        assert not np.allclose(served[backend], clf.served_probabilities(x, tta=False), atol=1e-4)
        assert clf.predict_arrays(x[:1])[0].probabilities["PNEUMONIA"] == pytest.approx(served[backend][0, 1],
                                                                                        abs=1e-6)
    assert np.allclose(served["onnx"], served["keras"], atol=1e-4)


def test_app_setting_turns_tta_on(varying_exported, fullsize_dir):
    import io

    from chestxray.serving import create_app

    xray = sorted(fullsize_dir.glob("*/*.jpeg"))[0].read_bytes()
    expected = Predictor.from_artifacts(varying_exported, tta=True).predict_bytes(xray)
    client = create_app({"CHESTXRAY_ARTIFACTS": str(varying_exported), "CHESTXRAY_TTA": "1",
                         "GEMINI_API_KEY": ""}).test_client()
    assert client.get("/model/info").get_json()["tta"] is True
    body = client.post("/predict", data={"file": (io.BytesIO(xray), "x.jpeg")}).get_json()
    assert body["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)


# --- corruptions ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xray(kermany224) -> np.ndarray:
    return cv2.imread(str(sorted((kermany224 / "test" / "NORMAL").glob("*.jpeg"))[0]), cv2.IMREAD_GRAYSCALE)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_changes_the_image_keeps_its_type_and_grows_with_severity(xray, name):
    changes = []
    for severity in (1, 2):
        out = corrupt(xray, name, severity, np.random.default_rng(7))
        assert out.dtype == np.uint8 and out.shape == xray.shape
        changes.append(float(np.abs(out.astype(float) - xray).mean()))
    assert 0.5 < changes[0] < changes[1], changes
    assert np.array_equal(corrupt(xray, name, 2, np.random.default_rng(7)),
                          corrupt(xray, name, 2, np.random.default_rng(7)))  # seeded: reproducible


def test_directional_corruptions_go_both_ways_across_images(xray):
    directions = {np.sign(corrupt(xray, "brightness", 1, np.random.default_rng(i)).astype(float).mean() - xray.mean())
                  for i in range(20)}
    assert directions == {-1.0, 1.0}


def test_unknown_corruption_or_severity_is_a_clear_error(xray):
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(xray, "fog", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity must be 1 or 2"):
        corrupt(xray, "jpeg", 3, np.random.default_rng(0))


# --- the stage ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def robustness_run(varying_exported, kermany224, tmp_path_factory):
    """The stage's own function on an exported model and 8 of 12 real test images (4 per class)."""
    root = copy_model(varying_exported, tmp_path_factory.mktemp("robust"), ("training", "evaluation", "export"))
    data = real_test_data(root, kermany224, per_class=6)
    config = {"mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "t",
                         "registered_model": "t"}}
    import mlflow

    mlflow.end_run()  # no run left active in this process by an earlier test
    with pytest.MonkeyPatch.context() as env:
        # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, and the environment outranks config,
        # so an earlier test's store would otherwise receive this run.
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        stage.robustness({"max_images": 8, "seed": 3, "calibration_bins": 10}, config, data, root / "training",
                         root / "evaluation", root / "export", root / "robustness")
    return root


def test_stage_writes_a_row_per_corruption_and_severity_plus_clean_and_tta(robustness_run):
    table = pd.read_csv(robustness_run / "robustness" / "table.csv")
    assert len(table) == 2 + 2 * len(CORRUPTIONS)
    assert list(table.variant[:2]) == ["clean", "clean_tta"]
    assert set(table.corruption[2:]) == set(CORRUPTIONS)
    assert table.groupby("corruption").severity.apply(sorted).loc["jpeg"] == [1, 2]
    for column in ("accuracy", "roc_auc", "ece"):
        assert table[column].between(0, 1).all(), column
    corrupted = table[table.severity > 0]
    assert corrupted.accuracy.nunique() > 1 and table.roc_auc.nunique() > 1  # the corruptions reach the model
    assert np.allclose(corrupted.accuracy_drop, table.accuracy[0] - corrupted.accuracy)
    assert (corrupted.accuracy_drop_ci95_low <= corrupted.accuracy_drop + 1e-9).all()


def test_stage_metrics_name_the_worst_drop_and_use_onnx(robustness_run):
    metrics = json.loads((robustness_run / "robustness" / "metrics.json").read_text())
    table = pd.read_csv(robustness_run / "robustness" / "table.csv")
    assert metrics["n_images"] == 8 and metrics["n_test"] == 12 and metrics["backend"] == "onnx"
    worst = table[table.severity > 0].accuracy_drop.max()
    assert metrics["worst_accuracy_drop"]["drop"] == pytest.approx(worst)
    assert metrics["variants"][metrics["worst_accuracy_drop"]["variant"]]["accuracy_drop"] == pytest.approx(worst)
    assert set(metrics["variants"]) == set(table.variant)


def test_stage_clean_row_is_what_the_classifier_serves(robustness_run):
    from chestxray.data.preprocess import load_image
    from chestxray.evaluation.metrics import classification_metrics

    clf = Predictor.from_artifacts(robustness_run, backend="onnx")
    manifest = pd.read_csv(robustness_run / "data" / "manifest.csv")
    labels = np.array([clf.classes.index(c) for c in manifest.label])
    chosen = stratified_subset(labels, 8, seed=3)
    x = np.stack([load_image(manifest.path[i], clf.image_size) for i in chosen])
    expected, _ = classification_metrics(labels[chosen], clf.served_probabilities(x), clf.classes, clf.normal_class,
                                         clf.calibration.decision_threshold)
    clean = pd.read_csv(robustness_run / "robustness" / "table.csv").iloc[0]
    assert clean.accuracy == pytest.approx(expected["accuracy"]) and clean.ece == pytest.approx(expected["ece"],
                                                                                                 abs=1e-5)


def test_stage_logs_the_table_to_mlflow(robustness_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{robustness_run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("t")
    assert experiment is not None, "the stage logged nothing to its configured store"
    (run,) = client.search_runs([experiment.experiment_id])
    assert "robustness.worst_accuracy_drop" in run.data.metrics
    assert "robustness.clean_tta.accuracy" in run.data.metrics
    assert run.data.tags["robustness.max_images"] == "8"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "robustness")}
    assert {"robustness/table.csv", "robustness/metrics.json"} <= artifacts
