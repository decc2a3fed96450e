"""Metrics per source / collection, and the two-class benchmark on one source's images.

A three-class model can score well overall by telling *where* an image came from: every TB film
of one collection shares its hospital, codec and burned-in text. Scores inside each collection
(manifest column `collection`, e.g. "kermany", "tb256/hospital", "tb256/public") show it: within a
collection that holds TB and normal films, the TB one-vs-rest AUC is TB against normals of the
same source, with the source held fixed.
"""
from __future__ import annotations

import numpy as np

from chestxray.evaluation.metrics import classification_metrics, one_vs_rest_auc, wilson_interval
from chestxray.model.decision import disease_score


def group_metrics(y: np.ndarray, probs: np.ndarray, predicted: np.ndarray, classes: list[str],
                  normal_class: str | None, groups: np.ndarray) -> dict:
    """{group: {n, accuracy, [roc_auc_any_disease], class: {count, recall, recall_ci95_*, [roc_auc]}}}.

    Per class inside each group: how many images, the share called that class, and the one-vs-rest
    ROC AUC of P(class) against the group's other images -- only where both sides exist (undefined
    AUCs are left out, not written as NaN). "any disease" AUC likewise, when the group holds normals.
    """
    y, predicted, groups = np.asarray(y), np.asarray(predicted), np.asarray(groups).astype(str)
    out = {}
    for group in sorted(set(groups)):
        inside = groups == group
        yg, pg, predg = y[inside], probs[inside], predicted[inside]
        entry: dict = {"n": int(inside.sum()), "accuracy": float((predg == yg).mean())}
        if normal_class in classes:
            auc = one_vs_rest_auc(yg != classes.index(normal_class), disease_score(pg, classes, normal_class))
            if np.isfinite(auc):
                entry["roc_auc_any_disease"] = auc
        for k, name in enumerate(classes):
            count = int((yg == k).sum())
            if not count:
                continue
            hits = int(((predg == k) & (yg == k)).sum())
            low, high = wilson_interval(hits, count)
            scores = {"count": count, "recall": hits / count, "recall_ci95_low": low, "recall_ci95_high": high}
            auc = one_vs_rest_auc(yg == k, pg[:, k])
            if np.isfinite(auc):
                scores["roc_auc"] = auc
            entry[name] = scores
        out[group] = entry
    return out


def renormalise(probs: np.ndarray, keep: list[int]) -> np.ndarray:
    """The probabilities of the `keep` classes divided by their sum (identity when nothing else exists)."""
    kept = np.asarray(probs, dtype=np.float64)[:, keep]
    return kept / np.clip(kept.sum(axis=1, keepdims=True), 1e-12, None)


def two_class_benchmark(y: np.ndarray, probs: np.ndarray, predicted: np.ndarray, classes: list[str],
                        keep: list[str], normal_class: str, threshold: float, bins: int = 10) -> dict | None:
    """Today's two-class metrics on the images labelled one of `keep` (e.g. NORMAL, PNEUMONIA).

    The disease probability is renormalised over the two classes, P(PNEUMONIA) / (P(NORMAL) +
    P(PNEUMONIA)) -- identical to the model's own output for a two-class model -- and the decision
    threshold chosen on validation is applied to it. `accuracy_served` is the product's own K-class
    call on the same images (a TUBERCULOSIS call on a pneumonia film counts as wrong). None when
    the images lack one of the two classes or a class is unknown to the model.
    """
    if any(c not in classes for c in keep) or normal_class not in keep:
        return None
    index = [classes.index(c) for c in keep]
    rows = np.isin(y, index)
    y2 = np.array([index.index(k) for k in np.asarray(y)[rows]], dtype=int)
    if len(np.unique(y2)) < 2:
        return None
    metrics, _ = classification_metrics(y2, renormalise(probs[rows], index), keep, normal_class, threshold, bins)
    metrics["accuracy_served"] = float((np.asarray(predicted)[rows] == np.asarray(y)[rows]).mean())
    metrics["n"] = int(rows.sum())
    return metrics
