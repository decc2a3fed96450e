"""The calibration a model is served with: what the evaluate stage chose on validation (thresholds.json).

    calibration = Calibration.from_thresholds(json.loads(Path("thresholds.json").read_text()))
    served = calibration.apply(raw_probabilities)            # temperature scaling
    chosen = calibration.decide(served, classes, normal)     # class index per row (chestxray.model.decision)

How the temperature and the thresholds are fitted is chestxray.evaluation.calibration; this is applying them.
Without thresholds.json: temperature 1, decision threshold 0.5, no low-confidence flag.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from chestxray.evaluation.calibration import apply_temperature
from chestxray.model.decision import decide


@dataclass(frozen=True)
class Calibration:
    """Temperature, decision threshold and low-confidence threshold; `chosen` is thresholds.json as written."""

    temperature: float = 1.0
    decision_threshold: float = 0.5
    low_confidence_threshold: float = 0.0
    chosen: dict = field(default_factory=dict)

    @classmethod
    def from_thresholds(cls, thresholds: dict | None) -> "Calibration":
        """From the evaluate stage's thresholds.json content (None: the identity calibration)."""
        thresholds = thresholds or {}
        return cls(float(thresholds.get("temperature", 1.0)), float(thresholds.get("decision_threshold", 0.5)),
                   float(thresholds.get("low_confidence", 0.0)), dict(thresholds))

    def apply(self, raw_probabilities: np.ndarray) -> np.ndarray:
        """Served probabilities: softmax(log p / temperature) per row."""
        return apply_temperature(raw_probabilities, self.temperature)

    def decide(self, served: np.ndarray, classes: list[str], normal_class: str | None) -> np.ndarray:
        """Predicted class index per row of served probabilities (N, C)."""
        return decide(served, classes, normal_class, self.decision_threshold)

    def is_low_confidence(self, confidence: float) -> bool:
        """True below the low-confidence threshold (where validation accuracy fell under its target)."""
        return confidence < self.low_confidence_threshold

    def chosen_with_tta(self) -> bool | None:
        """Whether evaluate chose these with test-time augmentation (None when it did not say)."""
        return bool(self.chosen["tta"]) if "tta" in self.chosen else None
