"""Evaluation metrics: threshold choice, calibration error and the clinical scores, on small exact cases."""
import numpy as np
import pytest

from chestxray.evaluation.metrics import choose_threshold, classification_metrics, expected_calibration_error

CLASSES = ["NORMAL", "PNEUMONIA"]


def probs_from(disease: list[float]) -> np.ndarray:
    d = np.array(disease)
    return np.stack([1 - d, d], axis=1)


def test_threshold_sits_in_the_middle_of_the_gap_between_classes():
    # normals score at most 0.2, diseased at least 0.8: any cut in (0.2, 0.8] is perfect; the middle is 0.5.
    y = np.array([0, 0, 0, 1, 1, 1])
    threshold = choose_threshold(y, probs_from([0.05, 0.1, 0.2, 0.8, 0.9, 0.95]), CLASSES, "NORMAL")
    assert threshold == pytest.approx(0.5, abs=1e-6)


def test_threshold_with_overlap_separates_as_youden_says():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = [0.1, 0.2, 0.3, 0.7, 0.4, 0.8, 0.85, 0.9]
    threshold = choose_threshold(y, probs_from(scores), CLASSES, "NORMAL")
    # Best J (0.75) is reached cutting in (0.3, 0.4] or in (0.7, 0.8]; the wider (in log-odds) is the second.
    assert 0.7 < threshold <= 0.8
    metrics, _ = classification_metrics(y, probs_from(scores), CLASSES, "NORMAL", threshold)
    assert metrics["sensitivity"] + metrics["specificity"] - 1 == pytest.approx(0.75)


def test_clinical_scores_and_confusion():
    y = np.array([0, 0, 1, 1])
    metrics, tables = classification_metrics(y, probs_from([0.1, 0.6, 0.7, 0.9]), CLASSES, "NORMAL", 0.5)
    assert metrics["sensitivity"] == 1.0 and metrics["specificity"] == 0.5 and metrics["accuracy"] == 0.75
    assert tables["confusion"] == [[1, 1], [0, 2]]
    assert metrics["roc_auc"] == 1.0


def test_expected_calibration_error_of_a_perfectly_calibrated_and_an_overconfident_model():
    y = np.array([1] * 8 + [0] * 2)  # 80% of cases are class 1
    calibrated = probs_from([0.8] * 10)
    assert expected_calibration_error(y, calibrated)[0] == pytest.approx(0.0, abs=1e-9)
    overconfident = probs_from([0.99] * 10)
    assert expected_calibration_error(y, overconfident)[0] == pytest.approx(0.19, abs=1e-6)
