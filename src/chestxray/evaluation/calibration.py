"""Calibrated confidence: temperature scaling (Guo et al. 2017) and the low-confidence threshold.

Both are fitted on the validation split by the evaluate stage and stored in thresholds.json; the
Predictor applies the temperature to every probability it serves (app, batch CLI, robustness).

The model ends in a softmax, so log p equals its logits up to a constant per row and
softmax(log p / T) is exactly softmax(logits / T): no second model output is needed.
"""
from __future__ import annotations

import numpy as np

# Bounds on log T for the fit: T in [0.05, 20] covers any sensible model, and keeps the search finite.
LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))
_TINY = 1e-30  # float32 softmax can underflow to 0; log(0) would poison the fit


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) per row: T > 1 softens over-confident probabilities, T < 1 sharpens them."""
    probs = np.asarray(probs)
    if temperature == 1.0 or probs.size == 0:
        return probs
    z = np.log(np.clip(probs.astype(np.float64), _TINY, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(probs.dtype)


def negative_log_likelihood(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean -log p(true class)."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y].astype(np.float64), _TINY, 1.0))))


def fit_temperature(y: np.ndarray, probs: np.ndarray) -> float:
    """The temperature minimising the NLL of `probs` (N, C) for labels `y` (validation data only)."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        return 1.0
    probs = np.asarray(probs, dtype=np.float64)
    result = minimize_scalar(lambda log_t: negative_log_likelihood(y, apply_temperature(probs, float(np.exp(log_t)))),
                             bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def served_confidence(probs: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """The confidence the app shows: the probability of the class the decision rule picked."""
    return np.asarray(probs)[np.arange(len(predicted)), predicted]


def choose_low_confidence(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float) -> dict:
    """The confidence below which validation accuracy falls under `target_accuracy`, and how it was found.

    Accuracy as a function of confidence is estimated by isotonic regression (non-decreasing, so one
    noisy bin cannot move the threshold around); predictions whose confidence is below the threshold
    are flagged. The threshold sits halfway between the most confident prediction still under the
    target and the least confident one at or above it. Edge cases: accuracy never under the target ->
    the minimum confidence (nothing flagged); never reaching it -> 1.0 (everything flagged).
    """
    from sklearn.isotonic import IsotonicRegression

    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    base = {"target_accuracy": float(target_accuracy), "n": int(len(confidence)),
            "method": "isotonic fit of correctness on served confidence (validation); flag below the "
                      "confidence where the fitted accuracy reaches the target"}
    if len(confidence) == 0:
        return {**base, "threshold": 0.0, "flagged_share": 0.0, "case": "no validation data: nothing flagged"}
    fitted = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(confidence, correct).predict(confidence)
    under = fitted < target_accuracy
    if not under.any():
        threshold, case = float(confidence.min()), "accuracy never under the target: nothing flagged"
    elif under.all():
        threshold, case = 1.0, "accuracy never reaches the target: everything flagged"
    else:
        threshold = float((confidence[under].max() + confidence[~under].min()) / 2)
        case = "threshold between the last confidence under the target and the first at or above it"
    flagged = confidence < threshold
    return {**base, "threshold": threshold, "flagged_share": float(flagged.mean()), "case": case,
            "accuracy_flagged": float(correct[flagged].mean()) if flagged.any() else None,
            "accuracy_not_flagged": float(correct[~flagged].mean()) if (~flagged).any() else None}
