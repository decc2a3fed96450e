"""Is this image like what the model was validated on? The population check as served: it never refuses.

    check = PopulationCheck.load("artifacts/reference", network.keras_sha256)
    distances = check.distances(features)                  # None when the check is off
    check.verdict(distance)                                # "accept" | "warn" (None when off)
    check.message(distance, intensity_mean, intensity_std) # the warning's words for a warned image

A warned prediction is still served, with the warning code "outside_validated_population" and words
that say how the image differs where the reference lets us say it: its exposure (mean gray level and
spread of the prepared image against the range of the reference X-rays), and in every case that its
features lie farther from the validation X-rays than those of (warn_quantile) of them. Whether an
image is a chest X-ray at all is not this check's question: a real X-ray from another hospital can be
far from the training population and still deserve an answer.

The distance itself (Mahalanobis, threshold) is chestxray.model.ood. The same reference folder holds
the drift reference the app's monitor compares with, so it is loaded here too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestxray.evaluation.drift import INTENSITY_MEAN, INTENSITY_STD, DriftReference
from chestxray.model.artifacts import REFERENCE_DIR
from chestxray.model.ood import WARN, OodDetector, OodReferenceError, read_reference
from chestxray.model.ood import WARNING as OUTSIDE_VALIDATED_POPULATION  # the warning code

log = logging.getLogger(__name__)

NO_REFERENCE = (f"no reference was loaded with this model (the reference stage writes it to artifacts/{REFERENCE_DIR}/ "
                "and logs it to the run of the registered version) -- run `dvc repro reference`")
EXPOSURE = "exposure"  # ood.json section: the range of the reference X-rays' intensity statistics
DEFAULT_WARN_QUANTILE = 0.99  # what references written before ood.json recorded it were fitted with
METHOD = "Mahalanobis distance of the pooled backbone features to training X-rays"


@dataclass(frozen=True)
class ExposureRange:
    """The range [low, high] of one input statistic that holds all but `tail` of the reference X-rays on each side."""

    low: float
    high: float


def exposure_ranges(signals: dict[str, np.ndarray], tail: float) -> dict:
    """The ood.json `exposure` section: per intensity statistic, its `tail` and 1 - `tail` quantiles.

    `signals` are the per-image values (evaluation.drift.input_signals) of the reference X-rays.
    """
    if not 0 < tail < 0.5:
        raise ValueError(f"reference params: need 0 < exposure_tail < 0.5, got {tail}")
    section: dict = {"tail": tail}
    for name in (INTENSITY_MEAN.name, INTENSITY_STD.name):
        low, high = np.quantile(np.asarray(signals[name], np.float64), [tail, 1 - tail])
        section[name] = {"low": round(float(low), 2), "high": round(float(high), 2)}
    return section


def _percent(share: float) -> str:
    return f"{100 * share:.3g}%"


def exposure_words(mean: float | None, std: float | None, ranges: dict[str, ExposureRange],
                   tail: float) -> str | None:
    """A sentence saying how the image's exposure differs from the reference X-rays; None when it does not.

    Darker/brighter: its mean gray level is outside the mean's range; lower/higher contrast: the spread
    of its gray levels is outside that range. Both measured on the prepared image (0-255).
    """
    traits, figures = [], []
    for value, name, below, above, label in (
            (mean, INTENSITY_MEAN.name, "darker", "brighter", "mean gray level"),
            (std, INTENSITY_STD.name, "lower in contrast", "higher in contrast", "spread of gray levels")):
        limits = ranges.get(name)
        if value is None or limits is None or limits.low <= value <= limits.high:
            continue
        traits.append(below if value < limits.low else above)
        figures.append(f"{label} {value:.0f} against {limits.low:.0f} to {limits.high:.0f} for "
                       f"{_percent(1 - 2 * tail)} of them")
    if not traits:
        return None
    # Outside the [tail, 1 - tail] range on one side: beyond 1 - tail of the reference X-rays on that side.
    return (f"The image is {' and '.join(traits)} than {_percent(1 - tail)} of the X-rays the model was "
            f"trained and validated on ({', '.join(figures)}, on a 0-255 scale).")


def population_message(distance: float, warn: float, warn_quantile: float, exposure: str | None = None) -> str:
    """The words of the "outside_validated_population" warning: how the image differs, and what that means.

    No semicolons: the batch CSV joins "code: words" pairs with "; ".
    """
    subject = "Its features" if exposure else "This image's features"
    general = (f"{subject} lie farther from the X-rays the model was validated on than those of "
               f"{_percent(warn_quantile)} of validation X-rays (distance {distance:.1f}, warning from {warn:.1f}), "
               "so this prediction may be less reliable.")
    return f"{exposure} {general}" if exposure else general


class PopulationCheck:
    """The detector (None: the check is off, `off_reason` says why), its exposure ranges and the drift reference."""

    def __init__(self, detector: OodDetector | None = None, drift_reference: DriftReference | None = None,
                 off_reason: str | None = None, warn_quantile: float = DEFAULT_WARN_QUANTILE,
                 exposure: dict | None = None):
        self.detector = detector
        self.drift_reference = drift_reference if detector is not None else None
        self.off_reason = None if detector is not None else (off_reason or NO_REFERENCE)
        self.warn_quantile = float(warn_quantile)
        exposure = exposure or {}
        self.exposure_tail = float(exposure.get("tail", 0.0))
        self.exposure = {name: ExposureRange(float(r["low"]), float(r["high"]))
                         for name, r in exposure.items() if isinstance(r, dict)}

    @classmethod
    def load(cls, folder: str | Path | None, keras_sha256: str | None,
             no_reference_reason: str | None = None) -> "PopulationCheck":
        """The check in a reference folder (its files read once) fitted on the model with this hash.

        Off (with the reason) when there is no reference, or it belongs to another model (logged).
        """
        reference = read_reference(folder) if folder is not None else None
        if reference is None:
            return cls(off_reason=no_reference_reason)
        try:
            detector = OodDetector.from_reference(*reference, keras_sha256, folder)
        except OodReferenceError as exc:
            log.warning("population check off: %s", exc)
            return cls(off_reason=str(exc))
        summary = reference[0]
        quantile = summary.get("thresholds", {}).get("warn_quantile", DEFAULT_WARN_QUANTILE)
        # References written before the exposure ranges existed load too: their warning has no exposure words.
        return cls(detector, DriftReference.from_reference(*reference), warn_quantile=quantile,
                   exposure=summary.get(EXPOSURE))

    @property
    def on(self) -> bool:
        return self.detector is not None

    def distances(self, features: np.ndarray | None) -> np.ndarray | None:
        """Distance (N,) of each image's features to the training X-rays; None when the check is off."""
        if self.detector is None or features is None:
            return None
        return self.detector.distances(features)

    def verdict(self, distance: float | None) -> str | None:
        """"accept" or "warn" for one distance; None when the check is off. Never a refusal."""
        if self.detector is None or distance is None:
            return None
        return self.detector.verdict(distance)

    def message(self, distance: float, intensity_mean: float | None = None,
                intensity_std: float | None = None) -> str:
        """The words for a warned image: its exposure where it is outside the reference range, and its distance."""
        exposure = exposure_words(intensity_mean, intensity_std, self.exposure, self.exposure_tail)
        return population_message(distance, self.detector.warn, self.warn_quantile, exposure)

    def warnings(self, distance: float | None, intensity_mean: float | None = None,
                 intensity_std: float | None = None) -> dict[str, str]:
        """{"outside_validated_population": words} for a warned image, else {} (also when the check is off)."""
        if self.verdict(distance) != WARN:
            return {}
        return {OUTSIDE_VALIDATED_POPULATION: self.message(distance, intensity_mean, intensity_std)}

    def info(self) -> dict:
        """Whether the check is on, its threshold and exposure ranges, or why it is off (for /model/info)."""
        if self.detector is None:
            return {"enabled": False, "reason": self.off_reason}
        return {"enabled": True, "method": METHOD, "warning": OUTSIDE_VALIDATED_POPULATION, "refuses": False,
                "warn_distance": self.detector.warn, "warn_quantile": self.warn_quantile, "chosen_on": "validation",
                "exposure_ranges": {name: {"low": r.low, "high": r.high} for name, r in self.exposure.items()}}
