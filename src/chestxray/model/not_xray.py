"""The "not a chest X-ray" check as served: the reference stage's detector loaded for one model.

    check = NotXrayCheck.load("artifacts/reference", network.keras_sha256)
    distances = check.distances(features)        # None when the check is off
    check.verdict(distance)                       # "accept" | "warn" | "refuse" (None when off)
    check.refusal(distance)                       # the 422 ImageRejected for a refused image, else None

The detector itself (Mahalanobis distance, thresholds) is chestxray.model.ood. The same reference
folder holds the drift reference the app's monitor compares with, so it is loaded here too.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from chestxray.data.acceptance import ImageRejected
from chestxray.evaluation.drift import DriftReference
from chestxray.model.artifacts import REFERENCE_DIR
from chestxray.model.ood import REFUSE, OodDetector, OodReferenceError, read_reference
from chestxray.model.ood import WARNING as NOT_A_CHEST_XRAY  # the warning and the refusal's error code

log = logging.getLogger(__name__)

NO_REFERENCE = (f"no reference was loaded with this model (the reference stage writes it to artifacts/{REFERENCE_DIR}/ "
                "and logs it to the run of the registered version) -- run `dvc repro reference`")


class NotXrayCheck:
    """The detector (None: the check is off, `off_reason` says why) and the drift reference that came with it."""

    def __init__(self, detector: OodDetector | None = None, drift_reference: DriftReference | None = None,
                 off_reason: str | None = None):
        self.detector = detector
        self.drift_reference = drift_reference if detector is not None else None
        self.off_reason = None if detector is not None else (off_reason or NO_REFERENCE)

    @classmethod
    def load(cls, folder: str | Path | None, keras_sha256: str | None,
             no_reference_reason: str | None = None) -> "NotXrayCheck":
        """The check in a reference folder (its files read once) fitted on the model with this hash.

        Off (with the reason) when there is no reference, or it belongs to another model (logged).
        """
        reference = read_reference(folder) if folder is not None else None
        if reference is None:
            return cls(off_reason=no_reference_reason)
        try:
            detector = OodDetector.from_reference(*reference, keras_sha256, folder)
        except OodReferenceError as exc:
            log.warning("'not a chest X-ray' check off: %s", exc)
            return cls(off_reason=str(exc))
        return cls(detector, DriftReference.from_reference(*reference))

    @property
    def on(self) -> bool:
        return self.detector is not None

    def distances(self, features: np.ndarray | None) -> np.ndarray | None:
        """Distance (N,) of each image's features to the training X-rays; None when the check is off."""
        if self.detector is None or features is None:
            return None
        return self.detector.distances(features)

    def verdict(self, distance: float | None) -> str | None:
        """"accept", "warn" or "refuse" for one distance; None when the check is off."""
        if self.detector is None or distance is None:
            return None
        return self.detector.verdict(distance)

    def refusal(self, distance: float | None) -> ImageRejected | None:
        """The 422 error for an image too far from the training X-rays to be classified, else None."""
        if self.verdict(distance) != REFUSE:
            return None
        return ImageRejected(422, NOT_A_CHEST_XRAY,
                             f"this image does not look like a chest X-ray (distance {distance:.1f} to the X-rays "
                             f"the model was trained on; from {self.detector.refuse:.1f} an image is not "
                             "classified), so the model gives no answer for it -- upload a frontal chest X-ray")

    def info(self) -> dict:
        """Whether the check is on, its thresholds, or why it is off (for /model/info)."""
        if self.detector is None:
            return {"enabled": False, "reason": self.off_reason}
        return {"enabled": True, "method": "Mahalanobis distance of the pooled backbone features to training X-rays",
                "warn_distance": self.detector.warn, "refuse_distance": self.detector.refuse,
                "chosen_on": "validation"}
