"""A tiny three-class model (NORMAL / PNEUMONIA / TUBERCULOSIS) through evaluate, export and robustness.

Real images: Kermany children (normal, pneumonia) and adult films of both tb256 collections, with
the manifest columns ingest writes (source, collection, group). The model is small and barely
trained: these tests check that every stage handles three classes, not how well it scores.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import built_once, copy_model

pytestmark = pytest.mark.slow  # trains a model, then runs evaluate, export and robustness on it

CLASSES = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


def _images(kermany224, tb256, per: int, offset: int) -> list[dict]:
    """`per` films of each (class, collection) pair, starting at `offset` in name order."""
    picks = [("NORMAL", "kermany", "kermany", sorted((kermany224 / "test" / "NORMAL").glob("*.jpeg"))),
             ("PNEUMONIA", "kermany", "kermany", sorted((kermany224 / "test" / "PNEUMONIA").glob("*.jpeg"))),
             ("TUBERCULOSIS", "tb256", "tb256/hospital", sorted((tb256 / "TUBERCULOSIS").glob("TB.*.jpg"))),
             ("NORMAL", "tb256", "tb256/hospital", sorted((tb256 / "NORMAL").glob("others_*.jpg"))),
             ("TUBERCULOSIS", "tb256", "tb256/public", sorted((tb256 / "TUBERCULOSIS").glob("Tuberculosis-*.png"))),
             ("NORMAL", "tb256", "tb256/public", sorted((tb256 / "NORMAL").glob("Normal-*.png")))]
    return [{"path": str(p), "label": label, "source": source, "collection": collection, "group": p.stem}
            for label, source, collection, files in picks for p in files[offset:offset + per]]


@pytest.fixture(scope="module")
def three_class(tmp_path_factory, kermany224, tb256):
    """A 96 px MobileNetV2 trained for a few epochs on 48 real films, its data folder (val + test with
    source/collection/group) and the evaluate stage's output in a real MLflow store."""
    return built_once(tmp_path_factory, "three_class", lambda root: _train_and_evaluate(root, kermany224, tb256))


def _train_and_evaluate(root: Path, kermany224: Path, tb256: Path) -> None:
    import keras
    import mlflow

    from chestxray.data.preprocess import load_image
    from chestxray.model.build import build_model
    from chestxray.pipeline import evaluate as stage

    keras.utils.set_random_seed(0)
    train = _images(kermany224, tb256, 8, 40)
    x = np.stack([load_image(r["path"], 96) for r in train])
    y = np.array([CLASSES.index(r["label"]) for r in train])
    model = build_model("mobilenetv2", 96, 3, weights="none", dropout=0.1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=4, batch_size=16, verbose=0)
    (root / "training").mkdir()
    model.save(root / "training" / "model.keras")
    (root / "training" / "model_info.json").write_text(json.dumps(
        {"classes": CLASSES, "normal_class": "NORMAL", "image_size": 96, "backbone": "mobilenetv2"}))

    rows = [{**r, "split": "val"} for r in _images(kermany224, tb256, 4, 0)]
    rows += [{**r, "split": "test"} for r in _images(kermany224, tb256, 4, 10)]
    data = root / "data"
    data.mkdir()
    pd.DataFrame(rows).to_csv(data / "manifest.csv", index=False)
    config = {"mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "t",
                         "registered_model": "t"}}
    params = {"low_confidence_target_accuracy": 0.9, "calibration_bins": 10, "tta": False,
              "benchmark": {"source": "kermany", "classes": ["NORMAL", "PNEUMONIA"]}}
    mlflow.end_run()
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        stage.evaluate(params, config, data, root / "training", root / "evaluation")


def test_evaluate_reports_every_class_and_the_any_disease_call(three_class):
    metrics = json.loads((three_class / "evaluation" / "metrics.json").read_text())
    assert set(metrics["per_class"]) == set(CLASSES)
    tb = metrics["per_class"]["TUBERCULOSIS"]
    assert tb["support"] == 8
    assert tb["recall_ci95_low"] <= tb["recall"] <= tb["recall_ci95_high"]
    assert 0 <= tb["ece"] <= 1 and 0 <= tb["roc_auc"] <= 1
    assert metrics["n_test"] == 24
    for key in ("sensitivity", "specificity", "sensitivity_ci95_low", "specificity_ci95_high", "roc_auc_macro"):
        assert 0 <= metrics[key] <= 1, key
    thresholds = json.loads((three_class / "evaluation" / "thresholds.json").read_text())
    assert thresholds["temperature"] > 0 and 0 < thresholds["decision_threshold"] <= 1
    assert "most probable other class" in thresholds["rule"]
    # What the register stage promotes on: cross-entropy of the calibrated validation probabilities.
    assert 0 < metrics["val"]["log_loss"] < 10


def test_evaluate_logs_but_no_longer_registers(three_class):
    """Registering is the register stage's job (after export and reference): evaluate only logs to the run."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{three_class / 'mlflow.db'}")
    assert MlflowClient().search_registered_models() == []
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("t").experiment_id])
    evaluated = [r for r in runs if "val.log_loss" in r.data.metrics]  # robustness' test adds a run of its own
    assert evaluated and evaluated[0].data.metrics["val.log_loss"] > 0 and "test.roc_auc" in evaluated[0].data.metrics


def test_evaluate_confusion_plot_and_predictions_carry_three_classes(three_class):
    confusion = pd.read_csv(three_class / "evaluation" / "plots" / "confusion.csv")
    assert set(confusion.actual) == set(CLASSES) and len(confusion) == 24
    predictions = pd.read_csv(three_class / "evaluation" / "predictions.csv")
    assert {f"p_{c}" for c in CLASSES} <= set(predictions.columns)
    assert np.allclose(predictions[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-5)
    assert set(predictions.collection) == {"kermany", "tb256/hospital", "tb256/public"}


def test_evaluate_scores_each_class_within_each_collection(three_class):
    metrics = json.loads((three_class / "evaluation" / "metrics.json").read_text())
    predictions = pd.read_csv(three_class / "evaluation" / "predictions.csv")
    hospital = metrics["per_collection"]["tb256/hospital"]
    assert hospital["n"] == 8 and set(hospital) >= {"TUBERCULOSIS", "NORMAL"} and "PNEUMONIA" not in hospital
    rows = predictions[predictions.collection == "tb256/hospital"]
    from sklearn.metrics import roc_auc_score

    # TB against this collection's own normals, from the test predictions.
    assert hospital["TUBERCULOSIS"]["roc_auc"] == pytest.approx(
        roc_auc_score(rows.label == "TUBERCULOSIS", rows.p_TUBERCULOSIS))
    assert hospital["TUBERCULOSIS"]["recall"] == pytest.approx(
        (rows[rows.label == "TUBERCULOSIS"].predicted == "TUBERCULOSIS").mean())
    assert set(metrics["per_source"]) == {"kermany", "tb256"}


def test_evaluate_benchmark_is_two_class_on_the_kermany_images(three_class):
    metrics = json.loads((three_class / "evaluation" / "metrics.json").read_text())
    # Read back as the float32 numbers evaluate scored (the CSV holds their shortest repr): this barely trained
    # model gives every film the same probabilities to 7 digits, so its AUC rests on the last bit; parsed as
    # float64 the decimals rank the films differently (0.25 against 0.75 depending on the run's round-off).
    predictions = pd.read_csv(three_class / "evaluation" / "predictions.csv",
                              dtype={f"p_{c}": np.float32 for c in CLASSES})
    bench = metrics["benchmark"]
    kermany = predictions[predictions.source == "kermany"]
    assert bench["n"] == len(kermany) == 8
    assert bench["accuracy_served"] == pytest.approx((kermany.label == kermany.predicted).mean())
    from sklearn.metrics import roc_auc_score

    p_normal, p_pneumonia = (kermany[f"p_{c}"].astype(np.float64) for c in ("NORMAL", "PNEUMONIA"))
    renormalised = p_pneumonia / (p_normal + p_pneumonia)
    assert bench["roc_auc"] == pytest.approx(roc_auc_score(kermany.label == "PNEUMONIA", renormalised))


def test_evaluate_probes_whether_features_tell_the_collections_apart(three_class):
    probe = json.loads((three_class / "evaluation" / "metrics.json").read_text())["source_probe"]
    assert probe["n"] == 48 and set(probe["roc_auc"]) == {"kermany", "tb256/hospital", "tb256/public"}
    # 16 films from each collection: chance is a third.
    assert 0 <= probe["accuracy"] <= 1 and probe["chance_accuracy"] == pytest.approx(1 / 3)


def test_export_check_passes_with_three_outputs(three_class, tmp_path):
    from chestxray.model.onnx_export import TOLERANCE, OnnxRunner
    from chestxray.pipeline import export as export_stage

    paths = export_stage.split_paths(three_class / "data")
    result = export_stage.convert_and_check(three_class / "training", paths, tmp_path, TOLERANCE)
    assert result.passed and result.n_images == 24
    probabilities, _ = OnnxRunner.load(tmp_path / "model.onnx").run(np.zeros((1, 96, 96, 3), np.float32))
    assert probabilities.shape == (1, 3)


def test_robustness_stage_runs_on_three_classes(three_class, tmp_path):
    import mlflow

    from chestxray.pipeline import robustness as stage

    root = copy_model(three_class, tmp_path, ("training", "evaluation", "data"))
    config = {"mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "t",
                         "registered_model": "t"}}
    mlflow.end_run()
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        stage.robustness({"max_images": 12, "seed": 3, "calibration_bins": 10}, config, root / "data",
                         root / "training", root / "evaluation", root / "export", root / "robustness")
    metrics = json.loads((root / "robustness" / "metrics.json").read_text())
    assert metrics["n_images"] == 12 and metrics["backend"] == "keras"
    assert 0 <= metrics["variants"]["clean"]["accuracy"] <= 1 and "sensitivity" in metrics["variants"]["clean"]


def test_predictor_answers_a_tb_film_with_three_probabilities(three_class, tb256):
    from chestxray.model.artifacts import ModelFiles
    from chestxray.model.predictor import Predictor

    predictor = Predictor.load(ModelFiles(three_class / "training", three_class / "evaluation"), backend="keras")
    film = sorted((tb256 / "TUBERCULOSIS").glob("TB.*.jpg"))[0].read_bytes()
    prediction = predictor.predict_bytes(film)
    assert list(prediction.probabilities) == CLASSES
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert prediction.predicted_class in CLASSES


def test_predict_json_and_batch_csv_carry_every_class(three_class, tb256, tmp_path):
    from chestxray.cli import main
    from chestxray.serving import create_app

    film = sorted((tb256 / "TUBERCULOSIS").glob("Tuberculosis-*.png"))[0]
    client = create_app({"CHESTXRAY_ARTIFACTS": str(three_class), "GEMINI_API_KEY": ""}).test_client()
    body = client.post("/predict", data={"file": (film.open("rb"), film.name)}).get_json()
    assert set(body["probabilities"]) == set(CLASSES) and body["predicted_class"] in CLASSES

    folder = tmp_path / "films"
    folder.mkdir()
    (folder / film.name).write_bytes(film.read_bytes())
    assert main(["predict", str(folder), "--out", str(tmp_path / "out.csv"), "--artifacts", str(three_class),
                 "--backend", "keras"]) == 0
    row = pd.read_csv(tmp_path / "out.csv").iloc[0]
    assert {f"p_{c}" for c in CLASSES} <= set(row.index)
    assert row[[f"p_{c}" for c in CLASSES]].sum() == pytest.approx(1.0, abs=1e-4)
    assert row.predicted_class == body["predicted_class"]
