"""Classification metrics for clinicians: sensitivity/specificity for 'any disease', per-class scores, calibration.

Any number of classes: per-class precision/recall/F1, one-vs-rest ROC AUC and calibration error,
recall with a 95% Wilson interval (TB sensitivity is the TUBERCULOSIS row), the K x K confusion
matrix, and "any disease vs normal" at the validation-chosen threshold (see model/decision.py and
docs/three-class.md). With two classes the figures are what they always were.
"""
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


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval of a proportion successes/n; (nan, nan) when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n, which is
    where a sensitivity on a few hundred films usually sits.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


def class_calibration_error(truth: np.ndarray, score: np.ndarray, bins: int = 10) -> float:
    """One-vs-rest ECE of one class: |mean P(class) - share that is the class| per probability bin, weighted."""
    truth, score = np.asarray(truth, dtype=float), np.asarray(score, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin 0 is [0, 1/bins]; the rest (lo, hi]: a probability of exactly 0 still lands somewhere.
    index = np.clip(np.searchsorted(edges, score, side="left") - 1, 0, bins - 1)
    ece = 0.0
    for b in np.unique(index):
        inside = index == b
        ece += inside.mean() * abs(truth[inside].mean() - score[inside].mean())
    return float(ece)


def one_vs_rest_auc(truth: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for boolean `truth`; nan when only one side is present (not defined)."""
    truth = np.asarray(truth, dtype=bool)
    return float(roc_auc_score(truth, score)) if 0 < truth.sum() < len(truth) else float("nan")


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
        low, high = wilson_interval(int(((predicted == k) & (y == k)).sum()), int(support[k]))
        per_class[name] = {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                           "roc_auc": one_vs_rest_auc(y == k, probs[:, k]), "support": int(support[k]),
                           "recall_ci95_low": low, "recall_ci95_high": high,
                           "ece": class_calibration_error(y == k, probs[:, k], bins)}
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
        for name, hit, n in (("sensitivity", flagged & diseased, diseased),
                             ("specificity", ~flagged & ~diseased, ~diseased)):
            metrics[f"{name}_ci95_low"], metrics[f"{name}_ci95_high"] = wilson_interval(int(hit.sum()), int(n.sum()))
    tables = {"confusion": confusion_matrix(y, predicted, labels=labels).tolist(), "predicted": predicted,
              "reliability": reliability}
    return metrics, tables
