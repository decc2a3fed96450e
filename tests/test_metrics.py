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


# Three classes: NORMAL, PNEUMONIA, TUBERCULOSIS, on constructed cases whose answers are worked out by hand.
THREE = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


def three_class_case():
    """6 films: 2 of each class. One TB film is called PNEUMONIA, one normal film is called TB."""
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1],    # normal, right
                      [0.3, 0.1, 0.6],    # normal, called TB (1 - P(normal) = 0.7 >= 0.5)
                      [0.1, 0.8, 0.1],    # pneumonia, right
                      [0.2, 0.7, 0.1],    # pneumonia, right
                      [0.1, 0.5, 0.4],    # TB, called pneumonia (the most probable disease)
                      [0.05, 0.05, 0.9]])  # TB, right
    return y, probs


def test_three_class_per_class_scores_confusion_and_any_disease():
    from chestxray.evaluation.metrics import wilson_interval

    y, probs = three_class_case()
    metrics, tables = classification_metrics(y, probs, THREE, "NORMAL", 0.5)
    assert tables["confusion"] == [[1, 0, 1], [0, 2, 0], [0, 1, 1]]
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    tb = metrics["per_class"]["TUBERCULOSIS"]
    assert (tb["recall"], tb["precision"], tb["support"]) == (0.5, 0.5, 2)
    assert metrics["per_class"]["PNEUMONIA"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["PNEUMONIA"]["f1"] == pytest.approx(0.8)
    # TB one-vs-rest: TB scores 0.4, 0.9 against 0.1, 0.6, 0.1, 0.1 -> 7 of 8 pairs ordered right.
    assert tb["roc_auc"] == pytest.approx(7 / 8)
    assert (tb["recall_ci95_low"], tb["recall_ci95_high"]) == pytest.approx(wilson_interval(1, 2))
    # Any disease vs normal: all 4 diseased films flagged, 1 of 2 normals cleared.
    assert (metrics["sensitivity"], metrics["specificity"]) == (1.0, 0.5)
    assert metrics["sensitivity_ci95_low"] == pytest.approx(wilson_interval(4, 4)[0])
    # Headline AUC is 1 - P(normal): diseased 0.9, 0.8, 0.9, 0.95 vs normal 0.2, 0.7 -> perfectly ordered.
    assert metrics["roc_auc"] == 1.0
    per_class_aucs = [metrics["per_class"][c]["roc_auc"] for c in THREE]
    assert metrics["roc_auc_macro"] == pytest.approx(np.mean(per_class_aucs))


def test_wilson_interval_known_values():
    from chestxray.evaluation.metrics import wilson_interval

    # Published reference values (e.g. Newcombe 1998, Table I): 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)
    assert all(np.isnan(wilson_interval(0, 0)))


def test_per_class_calibration_error_one_vs_rest():
    from chestxray.evaluation.metrics import class_calibration_error

    # P(TB) is 0.25 on four films, one of which is TB: calibrated. 0.95 on two films, one TB: off by 0.45.
    truth = np.array([1, 0, 0, 0, 1, 0])
    score = np.array([0.25, 0.25, 0.25, 0.25, 0.95, 0.95])
    assert class_calibration_error(truth[:4], score[:4]) == pytest.approx(0.0)
    assert class_calibration_error(truth, score) == pytest.approx(2 / 6 * 0.45)
    y, probs = three_class_case()
    metrics, _ = classification_metrics(y, probs, THREE, "NORMAL", 0.5)
    assert metrics["per_class"]["NORMAL"]["ece"] == pytest.approx(
        class_calibration_error(y == 0, probs[:, 0]))


def test_two_class_output_keeps_its_figures():
    # The same four films as test_clinical_scores_and_confusion: nothing two-class changed meaning.
    y = np.array([0, 0, 1, 1])
    metrics, _ = classification_metrics(y, probs_from([0.1, 0.6, 0.7, 0.9]), CLASSES, "NORMAL", 0.5)
    assert metrics["per_class"]["PNEUMONIA"]["recall"] == metrics["sensitivity"] == 1.0
    assert metrics["roc_auc"] == metrics["per_class"]["PNEUMONIA"]["roc_auc"] == 1.0
