"""The decision rule (chestxray.model.decision) and the calibration a model is served with (chestxray.model.calibration).

Small exact cases: which class a row gets at, just under and just over the threshold, and what
thresholds.json turns into (with every key missing, present, or given as a string).
"""
from __future__ import annotations

import numpy as np
import pytest

from chestxray.evaluation.calibration import apply_temperature
from chestxray.model.calibration import Calibration
from chestxray.model.decision import decide, disease_score

THREE = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


def test_disease_score_is_one_minus_p_normal_wherever_normal_sits():
    probs = np.array([[0.25, 0.5, 0.25], [0.5, 0.125, 0.375]])
    assert disease_score(probs, THREE, "NORMAL").tolist() == [0.75, 0.5]
    assert disease_score(probs, ["PNEUMONIA", "NORMAL", "TUBERCULOSIS"], "NORMAL").tolist() == [0.5, 0.875]


def test_abnormal_at_exactly_the_threshold_normal_just_under_it():
    # 1 - P(normal) is 0.75 and 0.5 exactly (binary fractions): ">= threshold" is abnormal.
    probs = np.array([[0.25, 0.5, 0.25], [0.5, 0.125, 0.375]])
    assert decide(probs, THREE, "NORMAL", 0.75).tolist() == [1, 0]
    assert decide(probs, THREE, "NORMAL", 0.5).tolist() == [1, 2]
    assert decide(probs, THREE, "NORMAL", 0.7500001).tolist() == [0, 0]
    assert decide(probs, THREE, "NORMAL").tolist() == [1, 2]  # default threshold 0.5


def test_abnormal_rows_get_the_most_probable_disease_even_when_normal_is_the_top_class():
    # P(normal) = 0.6 is the largest, but with threshold 0.3 the row is abnormal: TB, not NORMAL.
    probs = np.array([[0.6, 0.1, 0.3], [0.6, 0.3, 0.1]])
    assert decide(probs, THREE, "NORMAL", 0.3).tolist() == [2, 1]
    assert decide(probs, THREE, "NORMAL", 0.5).tolist() == [0, 0]
    # Normal need not be class 0.
    assert decide(np.array([[0.3, 0.6, 0.1]]), ["PNEUMONIA", "NORMAL", "TB"], "NORMAL", 0.3).tolist() == [0]
    assert decide(np.array([[0.3, 0.6, 0.1]]), ["PNEUMONIA", "NORMAL", "TB"], "NORMAL", 0.5).tolist() == [1]


def test_float32_scores_are_compared_in_float64():
    # float32(0.7) is 0.69999998807907..., so 1 - P(normal) is 0.30000001192092... exactly: just under
    # a threshold of 0.300000012. Rounding the threshold to float32 would call the film abnormal.
    probs = np.array([[0.7, 0.3]], np.float32)
    assert decide(probs, ["NORMAL", "PNEUMONIA"], "NORMAL", 0.300000012).tolist() == [0]
    assert decide(probs, ["NORMAL", "PNEUMONIA"], "NORMAL", 0.30000001).tolist() == [1]


def test_without_a_normal_class_it_is_argmax_per_row():
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    for normal in (None, "NORMAL"):
        assert decide(probs, ["A", "B", "C"], normal, 0.01).tolist() == [1, 0, 2]
    assert decide(probs.tolist(), ["A", "B", "C"], None).tolist() == [1, 0, 2]


def test_decide_accepts_lists_and_leaves_the_input_alone():
    probs = np.array([[0.6, 0.1, 0.3]])
    assert decide(probs.tolist(), THREE, "NORMAL", 0.3).tolist() == [2]
    assert probs.tolist() == [[0.6, 0.1, 0.3]]


# --- Calibration: thresholds.json as served ---------------------------------------------------------

def test_without_thresholds_the_identity_calibration():
    for thresholds in (None, {}):
        calibration = Calibration.from_thresholds(thresholds)
        assert calibration == Calibration(1.0, 0.5, 0.0, {})
        assert calibration.chosen_with_tta() is None
    default = Calibration()
    assert (default.temperature, default.decision_threshold, default.low_confidence_threshold) == (1.0, 0.5, 0.0)
    assert default.chosen == {}
    probs = np.array([[0.8, 0.2]], np.float32)
    assert np.array_equal(default.apply(probs), probs)
    assert not default.is_low_confidence(0.0)


def test_from_thresholds_reads_every_key_and_keeps_the_rest():
    written = {"temperature": "2", "decision_threshold": 0.3, "low_confidence": 0.6, "tta": True, "chosen_on": "val"}
    calibration = Calibration.from_thresholds(written)
    assert (calibration.temperature, calibration.decision_threshold, calibration.low_confidence_threshold) == (
        2.0, 0.3, 0.6)
    assert isinstance(calibration.temperature, float)
    assert calibration.chosen == written and calibration.chosen is not written  # a copy
    # Each key alone: the others keep their defaults.
    assert Calibration.from_thresholds({"temperature": 1.5}) == Calibration(1.5, 0.5, 0.0, {"temperature": 1.5})
    assert Calibration.from_thresholds({"decision_threshold": 0.2}).decision_threshold == 0.2
    only_low = Calibration.from_thresholds({"low_confidence": 0.7})
    assert (only_low.temperature, only_low.decision_threshold, only_low.low_confidence_threshold) == (1.0, 0.5, 0.7)


def test_calibration_applies_its_temperature_and_decides_at_its_threshold():
    calibration = Calibration.from_thresholds({"temperature": 2.0, "decision_threshold": 0.3})
    raw = np.array([[0.64, 0.36], [0.9, 0.1]], np.float32)
    served = calibration.apply(raw)
    assert np.allclose(served, apply_temperature(raw, 2.0))
    assert served[0, 1] == pytest.approx(0.6 / (0.8 + 0.6), abs=1e-6)  # sqrt(0.36) / (sqrt(0.64) + sqrt(0.36))
    # Row 0: 1 - P(normal) = 0.43 >= 0.3 -> PNEUMONIA; row 1: 0.25 < 0.3 -> NORMAL.
    assert calibration.decide(served, ["NORMAL", "PNEUMONIA"], "NORMAL").tolist() == [1, 0]
    assert Calibration().decide(served, ["NORMAL", "PNEUMONIA"], "NORMAL").tolist() == [0, 0]
    assert calibration.decide(served, ["NORMAL", "PNEUMONIA"], None).tolist() == [0, 0]


def test_low_confidence_is_strictly_below_the_threshold():
    calibration = Calibration.from_thresholds({"low_confidence": 0.6})
    assert calibration.is_low_confidence(0.59)
    assert not calibration.is_low_confidence(0.6)
    assert not calibration.is_low_confidence(0.61)


@pytest.mark.parametrize("tta, expected", [(True, True), (False, False), (1, True), (0, False)])
def test_chosen_with_tta_says_what_evaluate_wrote(tta, expected):
    assert Calibration.from_thresholds({"tta": tta}).chosen_with_tta() is expected
    assert Calibration.from_thresholds({"temperature": 1.0}).chosen_with_tta() is None
