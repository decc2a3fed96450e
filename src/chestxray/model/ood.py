"""How far an image lies from the training X-rays in the model's own feature space.

The features are the model's pooled backbone features (the input of its head), taken from the same
forward pass as the probabilities. The reference stage fits their mean and a shrunk covariance
(Ledoit-Wolf: the feature dimension is close to the number of images) on training X-rays; an
image's score is its Mahalanobis distance to them. One threshold is set on validation X-rays only:
from `warn` the prediction is served with the warning "outside_validated_population"
(chestxray.model.population). The distance never refuses an image: a real X-ray from another
hospital can lie far from the training population and still be a chest X-ray; whether an image is
a chest X-ray at all is a separate detector's question.

    detector = OodDetector.load("artifacts/reference")       # None when the stage has not run
    distances = detector.distances(features)                  # (N,)
    detector.verdict(distances[0])                            # "accept" | "warn"
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestxray.model.blas import one_blas_thread

# Files of the reference stage's output folder (artifacts/reference/).
REFERENCE_FILE = "reference.npz"
OOD_FILE = "ood.json"
WARNING = "outside_validated_population"
ACCEPT, WARN = "accept", "warn"


class OodReferenceError(ValueError):
    """A reference folder that cannot be used with this model; the message says what to do."""


@dataclass
class OodDetector:
    """Mahalanobis distance to the training features, with the warn threshold chosen on validation."""

    mean: np.ndarray  # (D,)
    whitening: np.ndarray  # (D, D): |whitening @ (x - mean)| is the Mahalanobis distance
    warn: float

    @classmethod
    def fit(cls, features: np.ndarray) -> "OodDetector":
        """Fit mean and Ledoit-Wolf covariance on training features (N, D); the threshold is set afterwards."""
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, np.float64)
        if len(features) < 2:
            raise ValueError(f"need at least 2 training images to fit the reference, got {len(features)}")
        covariance = LedoitWolf().fit(features).covariance_
        # Cholesky of the precision, once: each distance is then one matrix-vector product. Fitted in
        # float64, kept in float32: half the memory traffic per request, distances within ~1e-6.
        whitening = np.linalg.cholesky(np.linalg.inv(covariance)).T
        return cls(features.mean(axis=0).astype(np.float32), whitening.astype(np.float32), np.inf)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance (N,) of each row of `features` (N, D) to the training features."""
        features = np.asarray(features, np.float32)
        if features.shape[-1] != len(self.mean):
            raise OodReferenceError(f"features have {features.shape[-1]} dimensions, the reference "
                                 f"{len(self.mean)}: re-run the reference stage (`dvc repro reference`)")
        with one_blas_thread():
            return np.linalg.norm((features - self.mean) @ self.whitening.T, axis=1).astype(np.float64)

    def set_threshold(self, val_distances: np.ndarray, warn_quantile: float) -> None:
        """warn: that quantile of validation distances (0.99: 1% of validation X-rays are warned about)."""
        val_distances = np.asarray(val_distances, np.float64)
        if not len(val_distances):
            raise ValueError("no validation images to set the population warning's threshold on")
        if not 0 < warn_quantile <= 1:
            raise ValueError(f"reference params: need 0 < warn_quantile <= 1, got {warn_quantile}")
        self.warn = float(np.quantile(val_distances, warn_quantile))

    def verdict(self, distance: float) -> str:
        """'accept' or 'warn' for one distance (never a refusal: see the module docstring)."""
        return WARN if distance >= self.warn else ACCEPT

    def save(self, folder: str | Path, arrays: dict[str, np.ndarray] | None = None) -> Path:
        """Write reference.npz (the detector, plus any extra `arrays`, e.g. drift histograms) into `folder`.

        `thresholds` holds [warn]; references written before the refuse threshold was dropped hold
        [warn, refuse], and load alike (the refuse value is ignored).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / REFERENCE_FILE, mean=self.mean, whitening=self.whitening,
                            thresholds=np.array([self.warn]), **(arrays or {}))
        return folder / REFERENCE_FILE

    @classmethod
    def load(cls, folder: str | Path, keras_sha256: str | None = None) -> "OodDetector | None":
        """The detector saved in `folder`; None if there is none. OodReferenceError if it belongs to another model."""
        reference = read_reference(folder)
        return None if reference is None else cls.from_reference(*reference, keras_sha256, folder)

    @classmethod
    def from_reference(cls, summary: dict, arrays: dict[str, np.ndarray], keras_sha256: str | None,
                       folder: str | Path) -> "OodDetector":
        """The detector in a reference read by `read_reference`; OodReferenceError if it belongs to another model."""
        if keras_sha256 is not None and summary.get("keras_sha256") != keras_sha256:
            raise OodReferenceError(f"{folder} was fitted on another model.keras (retrained since?) -- re-run the "
                                 "reference stage (`dvc repro reference`)")
        return cls(arrays["mean"], arrays["whitening"], float(arrays["thresholds"][0]))


def read_reference(folder: str | Path) -> tuple[dict, dict[str, np.ndarray]] | None:
    """(ood.json, every array of reference.npz) of a reference folder; None if either file is missing."""
    folder = Path(folder)
    if not (folder / REFERENCE_FILE).is_file() or not (folder / OOD_FILE).is_file():
        return None
    with np.load(folder / REFERENCE_FILE) as data:
        arrays = {key: data[key] for key in data.files}
    return json.loads((folder / OOD_FILE).read_text()), arrays
