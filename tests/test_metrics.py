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


# --- exact edges: where the threshold goes, bin boundaries, the interval's ends ---------------------

def test_threshold_takes_the_widest_of_equally_good_intervals_not_the_highest():
    # J = 2/3 cutting in (0.2, 0.7] or in (0.75, 0.8]; the first is far wider in log-odds: its middle is 0.433.
    y = np.array([0, 0, 0, 1, 1, 1])
    threshold = choose_threshold(y, probs_from([0.1, 0.2, 0.75, 0.7, 0.8, 0.9]), CLASSES, "NORMAL")
    assert threshold == pytest.approx(0.43303, abs=1e-5)


def test_threshold_when_the_best_cut_is_just_above_the_lowest_score():
    # Only the lowest score is normal: the best cut is in (0.1, 0.3], middle in log-odds 0.1791.
    threshold = choose_threshold(np.array([0, 1, 1]), probs_from([0.1, 0.3, 0.5]), CLASSES, "NORMAL")
    assert threshold == pytest.approx(0.179129, abs=1e-6)


def test_threshold_of_an_inverted_model_is_extreme_and_finite():
    # Diseased films score lower than normal ones: no cut beats calling everyone one way (J = 0); the
    # wider of "all diseased" (0, 0.2] and "all normal" (0.95, 1] in log-odds is the first.
    threshold = choose_threshold(np.array([0, 0, 1, 1]), probs_from([0.9, 0.95, 0.2, 0.3]), CLASSES, "NORMAL")
    assert threshold == pytest.approx(0.00049975, rel=1e-4)


def test_threshold_without_a_normal_class_is_one_half():
    y = np.array([0, 1, 2])
    probs = np.eye(3)
    assert choose_threshold(y, probs, ["A", "B", "C"], None) == 0.5
    assert choose_threshold(y, probs, ["A", "B", "C"], "NORMAL") == 0.5


def test_reliability_table_and_ece_with_five_bins():
    y, probs = three_class_case()
    # Top-class confidence 0.8, 0.6, 0.8, 0.7, 0.5, 0.9; argmax wrong for rows 1 (0.6) and 4 (0.5).
    ece, table = expected_calibration_error(y, probs, bins=5)
    assert table == [
        {"bin": "0.4-0.6", "confidence": pytest.approx(0.55), "accuracy": 0.0, "count": 2},
        {"bin": "0.6-0.8", "confidence": pytest.approx(0.7666667), "accuracy": 1.0, "count": 3},
        {"bin": "0.8-1.0", "confidence": pytest.approx(0.9), "accuracy": 1.0, "count": 1},
    ]
    assert ece == pytest.approx(2 / 6 * 0.55 + 3 / 6 * (1 - 0.7666667) + 1 / 6 * 0.1)


def test_a_confidence_on_a_bin_edge_counts_once_in_the_lower_bin():
    # A 0.5/0.5 row is called class 0 (the first maximum): right for rows 0 and 1, wrong for row 2.
    y = np.array([0, 0, 1, 1])
    ece, table = expected_calibration_error(y, probs_from([0.5, 0.5, 0.5, 1.0]))
    assert table == [{"bin": "0.4-0.5", "confidence": 0.5, "accuracy": pytest.approx(2 / 3), "count": 3},
                     {"bin": "0.9-1.0", "confidence": 1.0, "accuracy": 1.0, "count": 1}]
    assert ece == pytest.approx(3 / 4 * (2 / 3 - 0.5))


def test_per_class_calibration_bins_zero_and_the_top_bin():
    from chestxray.evaluation.metrics import class_calibration_error

    # 0.0 and 0.05 share bin [0, 0.1]: |1/2 - 0.025| = 0.475 (separate bins would give 0.525).
    assert class_calibration_error(np.array([1, 0]), np.array([0.0, 0.05])) == pytest.approx(0.475)
    # 0.85 and 0.95 are in different bins: 0.5 * 0.85 + 0.5 * 0.05.
    assert class_calibration_error(np.array([0, 1]), np.array([0.85, 0.95])) == pytest.approx(0.45)
    # 1.0 is in the top bin with 0.95; 0.5 is the top of bin (0.4, 0.5].
    assert class_calibration_error([1, 1, 0], [1.0, 0.95, 0.5]) == pytest.approx(2 / 3 * 0.025 + 1 / 3 * 0.5)
    assert class_calibration_error([1, 0], [0.45, 0.5]) == pytest.approx(0.025)
    # With 2 bins, 0.3 and 0.45 share [0, 0.5]; with 10 they would not.
    assert class_calibration_error([1, 0], [0.3, 0.45], bins=2) == pytest.approx(0.125)


def test_wilson_interval_stays_inside_zero_one_exactly():
    from chestxray.evaluation.metrics import wilson_interval

    # Without the clip, 5/5 would end at 1.0000000000000002 and 0/5 start at -2.8e-17.
    assert wilson_interval(5, 5)[1] == 1.0 and wilson_interval(0, 5)[0] == 0.0
    assert wilson_interval(1, 1) == pytest.approx((0.2065, 1.0), abs=1e-4)
    assert wilson_interval(8, 10, z=1.0) == pytest.approx((0.6491, 0.8964), abs=1e-4)


def test_auc_is_nan_without_both_sides():
    from chestxray.evaluation.metrics import one_vs_rest_auc, roc_auc

    assert np.isnan(one_vs_rest_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(one_vs_rest_auc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert one_vs_rest_auc([1, 0, 0], [0.4, 0.1, 0.5]) == 0.5
    assert one_vs_rest_auc(np.array([2, 0, 0]), [0.4, 0.1, 0.5]) == 0.5  # any non-zero is "the class"
    # Without a normal class the headline AUC is the unweighted mean of the one-vs-rest AUCs.
    y, probs = three_class_case()
    assert roc_auc(y, probs, THREE, None) == pytest.approx(np.mean([1.0, 1.0, 0.875]))


def test_every_reported_figure_with_five_bins():
    y, probs = three_class_case()
    metrics, tables = classification_metrics(y, probs, THREE, "NORMAL", 0.5, bins=5)
    assert set(metrics) == {"accuracy", "roc_auc", "roc_auc_macro", "f1_macro", "ece", "threshold", "per_class",
                            "sensitivity", "specificity", "sensitivity_ci95_low", "sensitivity_ci95_high",
                            "specificity_ci95_low", "specificity_ci95_high"}
    assert metrics["threshold"] == 0.5 and metrics["ece"] == pytest.approx(expected_calibration_error(y, probs, 5)[0])
    # F1: NORMAL 2/3 (p 1, r 1/2), PNEUMONIA 0.8, TB 1/2.
    assert metrics["f1_macro"] == pytest.approx((2 / 3 + 0.8 + 0.5) / 3)
    assert (metrics["specificity_ci95_low"], metrics["specificity_ci95_high"]) == pytest.approx((0.0945, 0.9055),
                                                                                               abs=1e-4)
    normal = metrics["per_class"]["NORMAL"]
    assert set(normal) == {"precision", "recall", "f1", "roc_auc", "support", "recall_ci95_low", "recall_ci95_high",
                           "ece"}
    assert (normal["precision"], normal["recall"], normal["support"]) == (1.0, 0.5, 2)
    # NORMAL recall 1 of 2 -> its Wilson interval; P(NORMAL) ECE with 5 bins: 0.05 and 0.1 share [0, 0.2].
    assert (normal["recall_ci95_low"], normal["recall_ci95_high"]) == pytest.approx((0.0945, 0.9055), abs=1e-4)
    from chestxray.evaluation.metrics import class_calibration_error
    assert normal["ece"] == pytest.approx(class_calibration_error(y == 0, probs[:, 0], bins=5))
    # The bins reach the per-class ECE too: 0.3 and 0.45 share [0, 0.5] with 2 bins (0.575 with 10).
    two, _ = classification_metrics(np.array([1, 0]), probs_from([0.3, 0.45]), CLASSES, "NORMAL", 0.5, bins=2)
    assert two["per_class"]["PNEUMONIA"]["ece"] == pytest.approx(0.125)
    assert tables["predicted"].tolist() == [0, 2, 1, 1, 1, 2]
    assert tables["reliability"] == expected_calibration_error(y, probs, 5)[1]


def test_a_class_nobody_has_or_predicts_still_gets_a_row():
    # TB appears in neither the labels nor the predictions: it keeps its row and column, scored 0, not 1.
    y = np.array([0, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    metrics, tables = classification_metrics(y, probs, THREE, "NORMAL", 0.5)
    assert tables["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    tb = metrics["per_class"]["TUBERCULOSIS"]
    assert (tb["precision"], tb["recall"], tb["f1"], tb["support"]) == (0.0, 0.0, 0.0, 0)
    assert np.isnan(tb["recall_ci95_low"]) and np.isnan(tb["roc_auc"])
    # One diseased film, one normal: both found.
    assert (metrics["sensitivity"], metrics["specificity"]) == (1.0, 1.0)
