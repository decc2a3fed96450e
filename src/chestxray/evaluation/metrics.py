"""Classification metrics for clinicians: sensitivity/specificity for 'any disease', per-class scores, calibration."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score,
                             roc_curve)

from chestxray.model.decision import decide, disease_score


def choose_threshold(y: np.ndarray, probs: np.ndarray, classes: list[str], normal_class: str | None) -> float:
    """Decision threshold on P(any disease) that maximises Youden's J (sensitivity + specificity - 1).

    Every threshold between two neighbouring scores gives the same J, and on well-separated
    validation data that interval is wide; its middle (in log-odds) keeps the largest margin to both
    classes. Call it with validation data only; the test split must never influence it.
    """
    if normal_class not in classes:
        return 0.5
    diseased = y != classes.index(normal_class)
    fpr, tpr, thresholds = roc_curve(diseased, disease_score(probs, classes, normal_class), drop_intermediate=False)
    youden = tpr - fpr
    # Scores >= thresholds[i] are called diseased, so ROC point i holds for any cut in (thresholds[i+1], thresholds[i]].
    intervals = [(float(thresholds[i + 1]) if i + 1 < len(thresholds) else 0.0, min(float(thresholds[i]), 1.0))
                 for i in np.flatnonzero(youden >= youden.max() - 1e-12)]
    low, high = max(intervals, key=lambda lh: _logit(lh[1]) - _logit(lh[0]))
    return float(_sigmoid((_logit(low) + _logit(high)) / 2))


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1 - p)))


def _sigmoid(x: float) -> float:
    return float(1 / (1 + np.exp(-x)))


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE of the top-class confidence, and the reliability table (one row per non-empty bin)."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            ece += inside.mean() * gap
            table.append({"bin": f"{lo:.1f}-{hi:.1f}", "confidence": float(confidence[inside].mean()),
                          "accuracy": float(correct[inside].mean()), "count": int(inside.sum())})
    return float(ece), table


def roc_auc(y: np.ndarray, probs: np.ndarray, classes: list[str], normal_class: str | None) -> float:
    """Headline AUC: normal vs any disease when there is a normal class, else macro one-vs-rest."""
    if normal_class in classes:
        return float(roc_auc_score(y != classes.index(normal_class), disease_score(probs, classes, normal_class)))
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def classification_metrics(y: np.ndarray, probs: np.ndarray, classes: list[str], normal_class: str | None,
                           threshold: float, bins: int = 10) -> tuple[dict, dict]:
    """(metrics for metrics.json, extra tables for plots): accuracy, AUCs, sensitivity, specificity, F1, ECE."""
    predicted = decide(probs, classes, normal_class, threshold)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=labels, zero_division=0)
    ece, reliability = expected_calibration_error(y, probs, bins)
    per_class = {}
    for k, name in enumerate(classes):
        auc = roc_auc_score(y == k, probs[:, k]) if 0 < (y == k).sum() < len(y) else float("nan")
        per_class[name] = {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                           "roc_auc": float(auc), "support": int(support[k])}
    metrics = {
        "accuracy": float(accuracy_score(y, predicted)),
        "roc_auc": roc_auc(y, probs, classes, normal_class),
        "roc_auc_macro": float(np.nanmean([c["roc_auc"] for c in per_class.values()])),
        "f1_macro": float(np.mean(f1)),
        "ece": ece,
        "threshold": float(threshold),
        "per_class": per_class,
    }
    if normal_class in classes:
        normal = classes.index(normal_class)
        diseased, flagged = y != normal, predicted != normal
        metrics["sensitivity"] = float((flagged & diseased).sum() / max(diseased.sum(), 1))
        metrics["specificity"] = float((~flagged & ~diseased).sum() / max((~diseased).sum(), 1))
    tables = {"confusion": confusion_matrix(y, predicted, labels=labels).tolist(), "predicted": predicted,
              "reliability": reliability}
    return metrics, tables
