"""The decision rule, in one place: from class probabilities to a predicted class.

With a normal class present, the question a clinician asks first is "normal or not?": an image is
abnormal when 1 - P(normal) reaches the decision threshold (chosen on validation by the evaluate
stage), and then gets the most probable disease class. Without a normal class it is plain argmax.
"""
from __future__ import annotations

import numpy as np


def disease_score(probs: np.ndarray, classes: list[str], normal_class: str | None) -> np.ndarray:
    """Probability of 'any disease' per row: 1 - P(normal)."""
    return 1.0 - probs[:, classes.index(normal_class)]


def decide(probs: np.ndarray, classes: list[str], normal_class: str | None, threshold: float = 0.5) -> np.ndarray:
    """Predicted class index per row of `probs` (N, C)."""
    probs = np.asarray(probs, dtype=np.float64)
    if normal_class not in classes:
        return probs.argmax(axis=1)
    normal = classes.index(normal_class)
    diseases = probs.copy()
    diseases[:, normal] = -1.0
    abnormal = disease_score(probs, classes, normal_class) >= threshold
    return np.where(abnormal, diseases.argmax(axis=1), normal)
