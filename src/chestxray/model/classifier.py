"""A trained classifier ready to predict: the Keras model plus what it needs to be read correctly.

    clf = Classifier.from_artifacts("artifacts")        # what `dvc repro` produced
    clf = Classifier.from_registry("chestxray", "champion")  # the MLflow registry's champion
    result = clf.predict_bytes(open("xray.jpeg", "rb").read())
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chestxray.data.preprocess import decode_image, prepare_image
from chestxray.model.decision import decide

# File names inside a model directory (the train stage's output) and the evaluation directory.
MODEL_FILE = "model.keras"
INFO_FILE = "model_info.json"
THRESHOLDS_FILE = "thresholds.json"
METRICS_FILE = "metrics.json"


@dataclass
class Prediction:
    predicted_class: str
    confidence: float
    probabilities: dict[str, float]
    low_confidence: bool
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class ModelNotFound(FileNotFoundError):
    """No trained model where one was expected; the message says how to get one."""


class Classifier:
    """A Keras model with its classes, input size, decision threshold and low-confidence threshold."""

    def __init__(self, model, info: dict, thresholds: dict | None = None, metrics: dict | None = None,
                 version: str = "unknown"):
        self.model = model
        self.info = info
        self.classes: list[str] = list(info["classes"])
        self.image_size: int = int(info["image_size"])
        self.normal_class: str | None = info.get("normal_class")
        thresholds = thresholds or {}
        self.decision_threshold: float = float(thresholds.get("decision_threshold", 0.5))
        self.low_confidence_threshold: float = float(thresholds.get("low_confidence", 0.0))
        self.metrics = metrics or {}
        self.version = version
        # Graph mode: several times faster than eager calls for one image, traced once per batch shape.
        import tensorflow as tf

        self._forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    @classmethod
    def from_dirs(cls, model_dir: str | Path, evaluation_dir: str | Path | None = None,
                  version: str | None = None) -> "Classifier":
        """Load model.keras + model_info.json from `model_dir`, thresholds and metrics from `evaluation_dir`."""
        import keras

        import chestxray.model.layers  # noqa: F401  (registers PixelScaling for loading)

        model_dir = Path(model_dir)
        model_path = model_dir / MODEL_FILE
        if not model_path.is_file():
            raise ModelNotFound(f"no trained model at {model_path} -- run `dvc repro` (or `python main.py`) first")
        info = json.loads((model_dir / INFO_FILE).read_text())
        thresholds = metrics = None
        if evaluation_dir is not None:
            evaluation_dir = Path(evaluation_dir)
            if (evaluation_dir / THRESHOLDS_FILE).is_file():
                thresholds = json.loads((evaluation_dir / THRESHOLDS_FILE).read_text())
            if (evaluation_dir / METRICS_FILE).is_file():
                metrics = json.loads((evaluation_dir / METRICS_FILE).read_text())
        if version is None:
            version = "sha256:" + hashlib.sha256(model_path.read_bytes()).hexdigest()[:12]
        model = keras.saving.load_model(model_path, compile=False)
        return cls(model, info, thresholds, metrics, version)

    @classmethod
    def from_artifacts(cls, root: str | Path = "artifacts") -> "Classifier":
        """Load what the pipeline wrote under `root` (training/ and evaluation/)."""
        root = Path(root)
        return cls.from_dirs(root / "training", root / "evaluation")

    @classmethod
    def from_registry(cls, name: str, alias: str = "champion") -> "Classifier":
        """Load the registered model version that carries `alias` (MLFLOW_TRACKING_URI picks the store)."""
        from chestxray.tracking import download_registered_model

        local_dir, version = download_registered_model(name, alias)
        return cls.from_dirs(local_dir / "model", local_dir / "evaluation", version=version)

    def probabilities(self, batch: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Class probabilities (N, C) for prepared inputs (N, size, size, 3)."""
        batch = np.asarray(batch, dtype=np.float32)
        out = [self._forward(batch[i : i + batch_size]).numpy() for i in range(0, len(batch), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def probabilities_for_files(self, paths: list[str], batch_size: int = 32) -> np.ndarray:
        """Class probabilities (N, C) for image files, streamed in batches through the shared preprocessing."""
        from chestxray.data.dataset import image_dataset

        out = [self._forward(batch).numpy() for batch in image_dataset(paths, self.image_size, batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_arrays(self, batch: np.ndarray) -> list[Prediction]:
        """Predictions for prepared inputs (N, size, size, 3)."""
        probs = self.probabilities(batch)
        chosen = decide(probs, self.classes, self.normal_class, self.decision_threshold)
        results = []
        for row, k in zip(probs, chosen):
            confidence = float(row[k])
            low = confidence < self.low_confidence_threshold
            results.append(Prediction(
                predicted_class=self.classes[k],
                confidence=confidence,
                probabilities={c: float(p) for c, p in zip(self.classes, row)},
                low_confidence=low,
                warnings=["low_confidence"] if low else [],
            ))
        return results

    def prepare(self, data: bytes) -> np.ndarray:
        """Decode image bytes and map them to this model's input (raises ImageError on bad input)."""
        return prepare_image(decode_image(data), self.image_size)

    def predict_bytes(self, data: bytes) -> Prediction:
        """Predict one image given as file bytes (JPEG, PNG or DICOM)."""
        return self.predict_arrays(self.prepare(data)[None])[0]
