"""Drift: the signals watched on served images, their histograms, and the comparison with the training reference.

The reference stage computes the reference histograms with these functions and the app's monitor
fills live ones with the same bins, so both sides are counted alike. A signal has drifted when the
(binned) two-sample Kolmogorov-Smirnov distance between live and reference is both significant
(above the KS critical value at ALPHA for the two sample sizes) and material (above MIN_EFFECT):
with many requests any tiny shift becomes significant, with few only a large one is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.001  # significance level of each comparison (several signals are watched, so a strict one)
MIN_EFFECT = 0.1  # smallest KS / total-variation distance reported as drift, however many requests


@dataclass(frozen=True)
class Signal:
    """A numeric value recorded per image, counted in fixed bins (values beyond the ends go in the end bins)."""

    name: str
    description: str
    edges: tuple[float, ...]

    def histogram(self, values: np.ndarray) -> np.ndarray:
        """Counts (len(edges) - 1,) of `values`."""
        values = np.clip(np.asarray(values, np.float64), self.edges[0], self.edges[-1])
        return np.histogram(values, bins=np.asarray(self.edges))[0].astype(np.int64)


def _linear(lo: float, hi: float, bins: int) -> tuple[float, ...]:
    return tuple(float(e) for e in np.linspace(lo, hi, bins + 1))


INTENSITY_MEAN = Signal("intensity_mean", "mean gray level of the model input (0-255)", _linear(0, 255, 64))
INTENSITY_STD = Signal("intensity_std", "standard deviation of the gray levels of the model input",
                       _linear(0, 128, 64))
IMAGE_SIDE = Signal("image_side", "longer side of the uploaded image in pixels",
                    tuple(float(e) for e in np.geomspace(64, 8192, 43)))
CONFIDENCE = Signal("confidence", "probability of the predicted class", _linear(0, 1, 50))
NUMERIC_SIGNALS = (INTENSITY_MEAN, INTENSITY_STD, IMAGE_SIDE, CONFIDENCE)  # and ood_signal(), whose bins vary


OOD_EDGES = "edges_ood_distance"  # reference.npz array: the distance's bin edges (they depend on the model)


def ood_signal(top: float) -> Signal:
    """The feature-space distance, binned from 0 to `top` (the reference stage uses 4x the warn threshold)."""
    return Signal("ood_distance", "Mahalanobis distance to the training X-rays' features", _linear(0, top, 64))


def _stored_ood_signal(arrays: dict[str, np.ndarray]) -> Signal:
    """The distance signal with the bins its reference histogram was counted in."""
    if OOD_EDGES in arrays:
        return Signal("ood_distance", ood_signal(1.0).description, tuple(float(e) for e in arrays[OOD_EDGES]))
    # References written before the refuse threshold was dropped binned up to 3x refuse (thresholds[1]).
    return ood_signal(3 * float(arrays["thresholds"][-1]))


def input_signals(batch: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image mean and std of the gray levels of prepared model inputs (N, size, size, 3)."""
    gray = np.asarray(batch, np.float32)[..., 0].reshape(len(batch), -1)
    return {INTENSITY_MEAN.name: gray.mean(axis=1), INTENSITY_STD.name: gray.std(axis=1)}


def ks_distance(live: np.ndarray, reference: np.ndarray) -> float:
    """Largest gap between the two binned cumulative distributions (0 = same, 1 = disjoint)."""
    live, reference = np.asarray(live, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(np.cumsum(live) / live.sum() - np.cumsum(reference) / reference.sum())))


def ks_critical(n: int, m: int, alpha: float = ALPHA) -> float:
    """The two-sample KS critical value for sample sizes n and m (asymptotic formula)."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def compare_numeric(live: np.ndarray, reference: np.ndarray) -> dict:
    """KS distance, the limit it must exceed, and whether it does (live and reference are bin counts)."""
    n, m = int(np.sum(live)), int(np.sum(reference))
    distance = ks_distance(live, reference)
    limit = max(ks_critical(n, m), MIN_EFFECT)
    return {"ks_distance": round(distance, 4), "limit": round(limit, 4), "drift": bool(distance > limit)}


def compare_categorical(live: dict[str, int], reference: dict[str, int]) -> dict:
    """Total-variation distance between two class mixes and a chi-square test of live against reference."""
    from scipy.stats import chi2

    names = sorted(set(live) | set(reference))
    counts = np.array([live.get(k, 0) for k in names], np.float64)
    expected_share = np.array([reference.get(k, 0) for k in names], np.float64) + 0.5  # no empty class
    expected_share /= expected_share.sum()
    n = counts.sum()
    distance = 0.5 * float(np.abs(counts / n - expected_share).sum())
    statistic = float(np.sum((counts - n * expected_share) ** 2 / (n * expected_share)))
    p_value = float(chi2.sf(statistic, max(len(names) - 1, 1)))
    return {"tv_distance": round(distance, 4), "p_value": p_value, "limit": MIN_EFFECT,
            "drift": bool(p_value < ALPHA and distance > MIN_EFFECT)}


@dataclass
class DriftReference:
    """What the reference stage recorded about validation/training X-rays: histograms, summaries, class mix."""

    signals: dict[str, Signal]
    histograms: dict[str, np.ndarray]
    summaries: dict[str, dict]
    class_mix: dict[str, int]

    @classmethod
    def from_reference(cls, ood_summary: dict, arrays: dict[str, np.ndarray]) -> "DriftReference | None":
        """From a reference folder's ood.json and reference.npz arrays; None if it has no drift reference."""
        summary = ood_summary.get("drift_reference")
        if not summary:
            return None
        signals = {s.name: s for s in (*NUMERIC_SIGNALS, _stored_ood_signal(arrays))}
        histograms = {name: arrays[f"hist_{name}"] for name in signals if f"hist_{name}" in arrays}
        return cls({n: signals[n] for n in histograms}, histograms,
                   {n: summary[n] for n in histograms if n in summary}, dict(summary.get("class_mix", {})))
