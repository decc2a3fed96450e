"""Calibrated confidence: temperature scaling, the low-confidence threshold, and both applied as served."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from chestxray.evaluation.calibration import apply_temperature, choose_low_confidence, fit_temperature
from chestxray.evaluation.metrics import choose_threshold, expected_calibration_error
from chestxray.model.predictor import Predictor
from chestxray.pipeline.evaluate import fit_on_validation
from helpers import copy_model

CLASSES = ["NORMAL", "PNEUMONIA"]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def overconfident(n: int, true_t: float, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), and a model reporting softmax(z * true_t): over-confident by true_t."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    truth = softmax(z)
    y = np.array([rng.choice(classes, p=p) for p in truth])
    return y, softmax(z * true_t).astype(np.float32)


def test_temperature_recovers_a_known_over_confidence_and_lowers_ece():
    y, probs = overconfident(20_000, true_t=2.5)
    temperature = fit_temperature(y, probs)
    assert temperature == pytest.approx(2.5, rel=0.05)
    before, _ = expected_calibration_error(y, probs)
    after, _ = expected_calibration_error(y, apply_temperature(probs, temperature))
    assert before > 0.1 and after < 0.02


def test_temperature_below_one_for_an_under_confident_model():
    y, probs = overconfident(20_000, true_t=0.5, classes=2, seed=1)
    assert fit_temperature(y, probs) == pytest.approx(0.5, rel=0.05)


def test_apply_temperature_keeps_ranking_and_sums_to_one_even_with_zeros():
    probs = np.array([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], np.float32)
    soft = apply_temperature(probs, 2.0)
    assert soft.dtype == np.float32 and np.allclose(soft.sum(axis=1), 1.0, atol=1e-6)
    assert (soft.argmax(axis=1) == probs.argmax(axis=1)).all()
    assert soft[0, 0] < 0.7 and np.isfinite(soft).all()
    assert soft[0, 0] == pytest.approx(np.sqrt(0.7) / (np.sqrt(0.7) + np.sqrt(0.2) + np.sqrt(0.1)), abs=1e-6)
    assert np.array_equal(apply_temperature(probs, 1.0), probs)


# --- the low-confidence threshold -----------------------------------------------------------------

def test_low_confidence_threshold_sits_where_accuracy_reaches_the_target():
    # Confidence 0.55-0.70: half right; 0.80-0.99: all right.
    low = np.linspace(0.55, 0.70, 20)
    high = np.linspace(0.80, 0.99, 80)
    confidence = np.concatenate([low, high])
    correct = np.concatenate([np.arange(20) % 2 == 0, np.ones(80, bool)])
    chosen = choose_low_confidence(confidence, correct, 0.9)
    assert chosen["threshold"] == pytest.approx(0.75)
    assert chosen["flagged_share"] == pytest.approx(0.2)
    assert chosen["accuracy_flagged"] == pytest.approx(0.5) and chosen["accuracy_not_flagged"] == 1.0


def test_low_confidence_ignores_one_lucky_bin_below_the_boundary():
    # A single right answer among wrong ones at low confidence must not split the flagged range.
    confidence = np.array([0.50, 0.52, 0.54, 0.56, 0.58, 0.60, 0.9, 0.92, 0.94, 0.96])
    correct = np.array([0, 0, 1, 0, 0, 0, 1, 1, 1, 1], bool)
    chosen = choose_low_confidence(confidence, correct, 0.9)
    assert chosen["threshold"] == pytest.approx(0.75)
    assert (confidence < chosen["threshold"]).sum() == 6


def test_low_confidence_edge_cases():
    confidence = np.array([0.6, 0.7, 0.8, 0.9])
    never_under = choose_low_confidence(confidence, np.ones(4, bool), 0.9)
    assert never_under["threshold"] == 0.6 and never_under["flagged_share"] == 0.0
    assert "nothing flagged" in never_under["case"]
    never_reached = choose_low_confidence(confidence, np.zeros(4, bool), 0.9)
    assert never_reached["threshold"] == 1.0 and never_reached["flagged_share"] == 1.0
    assert "everything flagged" in never_reached["case"]
    empty = choose_low_confidence(np.array([]), np.array([], bool), 0.9)
    assert empty["threshold"] == 0.0 and empty["flagged_share"] == 0.0


def test_evaluate_calibrates_first_then_chooses_both_thresholds_on_served_probabilities():
    y_val, raw_val = overconfident(2_000, true_t=3.0, classes=2, seed=2)
    y_test, raw_test = overconfident(500, true_t=3.0, classes=2, seed=3)
    thresholds, probs = fit_on_validation({"low_confidence_target_accuracy": 0.9},
                                          {"val": y_val, "test": y_test}, {"val": raw_val, "test": raw_test},
                                          CLASSES, "NORMAL")
    assert thresholds["temperature"] == pytest.approx(3.0, rel=0.1)
    assert np.allclose(probs["val"], apply_temperature(raw_val, thresholds["temperature"]))
    assert thresholds["decision_threshold"] == choose_threshold(y_val, probs["val"], CLASSES, "NORMAL")
    assert 0.5 < thresholds["low_confidence"] < 1.0  # labels are noisy near 0.5: those are flagged
    assert thresholds["low_confidence_rule"]["target_accuracy"] == 0.9 and thresholds["chosen_on"] == "validation"
    assert thresholds["tta"] is False
    json.dumps(thresholds)  # thresholds.json must be plain JSON


# --- exact values and edges -------------------------------------------------------------------------

def test_apply_temperature_gives_a_zero_probability_a_floor_not_minus_infinity():
    # log(0) is clipped at log(1e-30): at T = 20 that floor is 1e-30 ** (1/20) = 10 ** -1.5 before normalising.
    soft = apply_temperature(np.array([[1.0, 0.0]]), 20.0)
    floor = 10 ** -1.5
    assert soft[0].tolist() == pytest.approx([1 / (1 + floor), floor / (1 + floor)], rel=1e-9)
    empty = np.zeros((0, 2), np.float32)
    assert apply_temperature(empty, 2.0) is empty


def test_negative_log_likelihood_exact_values():
    from chestxray.evaluation.calibration import negative_log_likelihood

    probs = np.array([[0.5, 0.5], [0.75, 0.25]], np.float32)
    assert negative_log_likelihood(np.array([0, 1]), probs) == pytest.approx((np.log(2) + np.log(4)) / 2)
    # A true class given probability 0 costs -log(1e-30), not infinity.
    assert negative_log_likelihood(np.array([1]), np.array([[1.0, 0.0]])) == pytest.approx(30 * np.log(10))


def test_fit_temperature_edges_stay_inside_its_bounds():
    import warnings

    assert fit_temperature(np.array([], int), np.zeros((0, 2))) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unknown solver option" or other warning from the fit
        # One film, right: sharpening always helps, down to the lower bound 0.05; one film wrong: up to 20.
        assert fit_temperature(np.array([0]), np.array([[0.8, 0.2]])) == pytest.approx(0.05, rel=1e-3)
        assert fit_temperature(np.array([1]), np.array([[0.8, 0.2]])) == pytest.approx(20.0, rel=1e-3)


def test_low_confidence_record_says_how_it_was_found():
    method = ("isotonic fit of correctness on served confidence (validation); flag below the confidence "
              "where the fitted accuracy reaches the target")
    chosen = choose_low_confidence([0.6, 0.7, 0.8, 0.9], [0, 1, 1, 1], 0.9)
    assert chosen == {"target_accuracy": 0.9, "n": 4, "method": method, "threshold": pytest.approx(0.65),
                      "flagged_share": 0.25, "case": "threshold between the last confidence under the target and "
                                                     "the first at or above it",
                      "accuracy_flagged": 0.0, "accuracy_not_flagged": 1.0}
    never_under = choose_low_confidence([0.6, 0.7], [1, 1], 0.9)
    assert never_under["case"] == "accuracy never under the target: nothing flagged"
    assert never_under["accuracy_flagged"] is None and never_under["accuracy_not_flagged"] == 1.0
    never_reached = choose_low_confidence([0.6, 0.7], [1, 0], 0.99)  # pooled to 0.5
    assert never_reached["case"] == "accuracy never reaches the target: everything flagged"
    assert never_reached["accuracy_not_flagged"] is None and never_reached["accuracy_flagged"] == 0.5
    assert choose_low_confidence([], [], 0.9) == {"target_accuracy": 0.9, "n": 0, "method": method, "threshold": 0.0,
                                                  "flagged_share": 0.0, "case": "no validation data: nothing flagged"}


def test_fitted_accuracy_exactly_at_the_target_is_not_flagged():
    # The isotonic fit pools the first two films to 0.5: at a target of 0.5 that is enough.
    chosen = choose_low_confidence(np.array([0.5, 0.6, 0.7, 0.8]), np.array([1, 0, 1, 1], bool), 0.5)
    assert chosen["threshold"] == 0.5 and chosen["flagged_share"] == 0.0


def test_low_confidence_threshold_is_the_exact_midpoint_of_float32_confidences():
    confidence = np.array([0.6, 0.7], np.float32)
    chosen = choose_low_confidence(confidence, np.array([False, True]), 0.9)
    # The float64 midpoint (0.65000000596...), not the float32 one (0.64999997...).
    assert chosen["threshold"] == (float(confidence[0]) + float(confidence[1])) / 2


# --- served by the Predictor, on both backends ---------------------------------------------------

@pytest.fixture(scope="module")
def calibrated(tiny_exported, tmp_path_factory):
    """tiny_exported with temperature 2 and a low-confidence threshold in its thresholds.json."""
    root = copy_model(tiny_exported, tmp_path_factory.mktemp("calibrated"), ("training", "evaluation", "export"))
    (root / "evaluation" / "thresholds.json").write_text(json.dumps(
        {"decision_threshold": 0.5, "low_confidence": 0.55, "temperature": 2.0}))
    return root


def test_classifier_applies_the_temperature_on_both_backends(calibrated, tiny_exported, kermany224):
    prepare = Predictor.from_artifacts(tiny_exported, backend="keras").prepare
    x = np.stack([prepare(p.read_bytes()) for p in sorted((kermany224 / "test").glob("*/*.jpeg"))[::100]])
    for backend in ("onnx", "keras"):
        plain = Predictor.from_artifacts(tiny_exported, backend=backend)
        clf = Predictor.from_artifacts(calibrated, backend=backend)
        assert clf.backend == backend and clf.calibration.temperature == 2.0 and plain.calibration.temperature == 1.0
        raw = plain.served_probabilities(x)
        assert np.allclose(clf.raw_probabilities(x), raw, atol=1e-6)
        served = clf.served_probabilities(x)
        assert np.allclose(served, apply_temperature(raw, 2.0), atol=1e-5)
        predictions = clf.predict_arrays(x)
        for p, row in zip(predictions, served):
            assert p.confidence == pytest.approx(float(row.max()), abs=1e-6)
            assert p.low_confidence == (p.confidence < 0.55)


def test_app_serves_calibrated_probabilities_and_reports_the_temperature(calibrated, tiny_exported, fullsize_dir):
    import io

    from chestxray.serving import create_app

    xray = sorted(fullsize_dir.glob("*/*.jpeg"))[0].read_bytes()
    bodies = {}
    for name, root in (("plain", tiny_exported), ("calibrated", calibrated)):
        client = create_app({"CHESTXRAY_ARTIFACTS": str(root), "GEMINI_API_KEY": ""}).test_client()
        bodies[name] = client.post("/predict", data={"file": (io.BytesIO(xray), "x.jpeg")}).get_json()
        if name == "calibrated":
            info = client.get("/model/info").get_json()
            assert info["thresholds"] == {"decision_threshold": 0.5, "low_confidence": 0.55, "temperature": 2.0}
            assert info["tta"] is False
    raw = np.array([[bodies["plain"]["probabilities"][c] for c in CLASSES]])
    expected = apply_temperature(raw, 2.0)[0]
    assert [bodies["calibrated"]["probabilities"][c] for c in CLASSES] == pytest.approx(expected, abs=1e-5)


def test_tta_mismatch_with_the_thresholds_is_logged(calibrated, caplog, tmp_path):
    root = copy_model(calibrated, tmp_path, ("training", "evaluation"))
    thresholds = json.loads((root / "evaluation" / "thresholds.json").read_text())
    (root / "evaluation" / "thresholds.json").write_text(json.dumps({**thresholds, "tta": False}))
    with caplog.at_level(logging.WARNING):
        Predictor.from_artifacts(root, backend="keras", tta=True)
    assert "chosen without test-time augmentation but it is on now" in caplog.text
