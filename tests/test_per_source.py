"""Per-source / per-collection scores and the two-class benchmark, on constructed arrays with known answers."""
import numpy as np
import pytest

from chestxray.evaluation.metrics import classification_metrics
from chestxray.evaluation.per_source import group_metrics, renormalise, two_class_benchmark
from chestxray.model.decision import decide

THREE = ["NORMAL", "PNEUMONIA", "TUBERCULOSIS"]


def test_each_class_within_each_collection():
    # kermany: normal + pneumonia; tb256/hospital: TB + normal, where P(TB) ranks one normal above one TB film.
    groups = np.array(["kermany"] * 3 + ["tb256/hospital"] * 4)
    y = np.array([0, 1, 1, 2, 2, 0, 0])
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1],
                      [0.1, 0.1, 0.8], [0.5, 0.1, 0.4], [0.3, 0.1, 0.6], [0.9, 0.05, 0.05]])
    predicted = decide(probs, THREE, "NORMAL", 0.5)
    out = group_metrics(y, probs, predicted, THREE, "NORMAL", groups)
    assert set(out) == {"kermany", "tb256/hospital"}
    kermany, hospital = out["kermany"], out["tb256/hospital"]
    assert kermany["n"] == 3 and kermany["accuracy"] == pytest.approx(2 / 3)
    assert kermany["PNEUMONIA"]["count"] == 2 and kermany["PNEUMONIA"]["recall"] == 0.5
    assert "TUBERCULOSIS" not in kermany  # no TB films there: no entry, not a zero
    # TB vs this hospital's own normals: P(TB) 0.8, 0.4 vs 0.6, 0.05 -> 3 of 4 pairs.
    assert hospital["TUBERCULOSIS"]["roc_auc"] == pytest.approx(0.75)
    assert hospital["TUBERCULOSIS"]["recall"] == 1.0  # the 0.4 film too: 1 - P(normal) = 0.5 reaches 0.5
    assert hospital["NORMAL"]["recall"] == 0.5  # the normal with P(TB) 0.6 is called TB
    assert hospital["roc_auc_any_disease"] == pytest.approx(0.75)


def test_undefined_auc_is_left_out_not_nan():
    out = group_metrics(np.array([2, 2]), np.array([[0.1, 0.1, 0.8], [0.2, 0.2, 0.6]]), np.array([2, 2]), THREE,
                        "NORMAL", np.array(["tb256/public", "tb256/public"]))
    assert out["tb256/public"]["TUBERCULOSIS"] == {"count": 2, "recall": 1.0, "recall_ci95_low": pytest.approx(0.3424,
                                                                                                            abs=1e-4),
                                                  "recall_ci95_high": 1.0}
    assert "roc_auc_any_disease" not in out["tb256/public"]


def test_benchmark_renormalises_pneumonia_and_scores_the_served_call():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.7, 0.1, 0.2],   # normal: P'(pneumonia) = 0.125
                      [0.4, 0.3, 0.3],   # normal: P' = 3/7 = 0.43 -> normal; served: 1 - 0.4 = 0.6 -> pneumonia
                      [0.2, 0.2, 0.6],   # pneumonia: P' = 0.5 -> pneumonia; served call TB
                      [0.1, 0.8, 0.1]])  # pneumonia: P' = 0.89
    predicted = decide(probs, THREE, "NORMAL", 0.5)
    bench = two_class_benchmark(y, probs, predicted, THREE, ["NORMAL", "PNEUMONIA"], "NORMAL", 0.5)
    assert renormalise(probs, [0, 1])[1, 1] == pytest.approx(3 / 7)
    assert bench["accuracy"] == 1.0 and bench["n"] == 4
    assert bench["accuracy_served"] == 0.5  # normal #2 called pneumonia, pneumonia #1 called TB
    assert bench["roc_auc"] == 1.0 and bench["sensitivity"] == bench["specificity"] == 1.0


def test_benchmark_of_a_two_class_model_equals_its_own_metrics():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=50)
    probs = np.stack([1 - p, p], axis=1)
    y = (rng.uniform(size=50) < p).astype(int)
    classes = ["NORMAL", "PNEUMONIA"]
    own, _ = classification_metrics(y, probs, classes, "NORMAL", 0.4)
    bench = two_class_benchmark(y, probs, decide(probs, classes, "NORMAL", 0.4), classes, classes, "NORMAL", 0.4)
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "f1_macro", "ece"):
        assert bench[key] == pytest.approx(own[key], abs=1e-12), key
    assert bench["accuracy_served"] == pytest.approx(own["accuracy"])


def test_benchmark_needs_both_classes_known_and_present():
    probs = np.array([[0.9, 0.1], [0.8, 0.2]])
    assert two_class_benchmark(np.array([0, 0]), probs, np.array([0, 0]), ["NORMAL", "PNEUMONIA"],
                               ["NORMAL", "PNEUMONIA"], "NORMAL", 0.5) is None
    assert two_class_benchmark(np.array([0, 1]), probs, np.array([0, 0]), ["NORMAL", "TUBERCULOSIS"],
                               ["NORMAL", "PNEUMONIA"], "NORMAL", 0.5) is None


@pytest.mark.parametrize("sources, n", [(["data"] * 6, 6), (["kermany"] * 4 + ["tb256"] * 2, 4)])
def test_the_benchmark_takes_every_film_of_a_one_source_run_and_only_its_source_otherwise(sources, n):
    # `-S data.source=...` names its one source "data": the two-class run must still carry the benchmark block.
    import pandas as pd

    from chestxray.pipeline.evaluate import by_source

    classes = ["NORMAL", "PNEUMONIA"]
    y = np.array([0, 1, 0, 1, 0, 1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.1, 0.9], [0.8, 0.2]])
    test = pd.DataFrame({"source": sources, "collection": sources})
    params = {"benchmark": {"source": "kermany", "classes": classes}, "calibration_bins": 10}
    out = by_source(params, test, y, probs, decide(probs, classes, "NORMAL", 0.5), classes, "NORMAL", 0.5)
    assert out["benchmark"]["n"] == n
