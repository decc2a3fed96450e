"""The "not a chest X-ray" check as served: the xray_check stage's detector, asked before the classifier.

    check = ChestXrayCheck.load("artifacts/xray_check")
    scores = check.scores(inputs)            # P(chest X-ray) per prepared input (N, size, size, 3); None when off
    check.refusal(scores[0])                 # the 422 ImageRejected for what is not a chest X-ray, else None

Only this check refuses an image. How far an X-ray lies from the population the classifier was
validated on is a different question with a warning, not a refusal (chestxray.model.population).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from chestxray.data.acceptance import ImageRejected
from chestxray.model.artifacts import XRAY_CHECK_DIR
from chestxray.model.xray_detector import DETECTOR_FILE, XrayDetector, detector_input

NOT_A_CHEST_XRAY = "not_a_chest_xray"  # the refusal's error code
NO_DETECTOR = (f"no detector was loaded (the xray_check stage writes artifacts/{XRAY_CHECK_DIR}/{DETECTOR_FILE}) "
               "-- run `dvc repro xray_check`")


class ChestXrayCheck:
    """The detector (None: the check is off and `off_reason` says why)."""

    def __init__(self, detector: XrayDetector | None = None, off_reason: str | None = None):
        self.detector = detector
        self.off_reason = None if detector is not None else (off_reason or NO_DETECTOR)

    @classmethod
    def load(cls, folder: str | Path | None) -> "ChestXrayCheck":
        """The check saved in `folder` (the xray_check stage's output); off with the reason when there is none."""
        detector = XrayDetector.load(folder) if folder is not None else None
        return cls(detector)

    @property
    def on(self) -> bool:
        return self.detector is not None

    def scores(self, inputs: np.ndarray) -> np.ndarray | None:
        """P(chest X-ray) (N,) of prepared model inputs (N, size, size, 3); None when the check is off."""
        if self.detector is None or not len(inputs):
            return None
        return self.detector.scores(np.stack([detector_input(x) for x in inputs]))

    def refusal(self, score: float | None) -> ImageRejected | None:
        """The 422 error for an image the detector does not take for a chest X-ray, else None."""
        if self.detector is None or score is None or self.detector.accepts(score):
            return None
        return ImageRejected(422, NOT_A_CHEST_XRAY,
                             "this image does not look like a chest X-ray (a photo, a document, another body part "
                             "or another kind of scan?), so the model gives no answer for it -- upload a frontal "
                             "chest X-ray (JPEG, PNG or DICOM)")

    def info(self) -> dict:
        """Whether the check is on, its threshold, or why it is off (for /model/info)."""
        if self.detector is None:
            return {"enabled": False, "reason": self.off_reason}
        return {"enabled": True, "method": "a small network of its own on a 64x64 thumbnail, fitted on chest X-rays "
                "of every source against other images (xray_check stage)",
                "threshold": self.detector.threshold, "chosen_on": "out-of-fold scores, leaving one source out"}
