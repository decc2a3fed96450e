"""A trained classifier ready to predict: the Keras model plus what it needs to be read correctly.

    clf = Classifier.from_artifacts("artifacts")        # what `dvc repro` produced (ONNX Runtime if exported)
    clf = Classifier.from_registry("chestxray", "champion")  # the MLflow registry's champion
    result = clf.predict_bytes(open("xray.jpeg", "rb").read())

With artifacts/reference/ (the reference stage) each prediction also carries `ood_distance`, the
distance of the image to the training X-rays in the model's feature space (chestxray.model.ood):
a "not_a_chest_xray" warning from the warn threshold, `clf.refuses(prediction)` from the refuse one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chestxray.data.preprocess import decode_image, prepare_image
from chestxray.evaluation.calibration import apply_temperature
from chestxray.evaluation.drift import DriftReference
from chestxray.model.decision import decide
from chestxray.model.ood import ACCEPT, REFUSE, OodDetector, OodReferenceError, read_reference
from chestxray.model.ood import WARNING as OOD_WARNING
from chestxray.model.tta import tta_probabilities

log = logging.getLogger(__name__)

# File names inside a model directory (the train stage's output) and the evaluation directory.
MODEL_FILE = "model.keras"
INFO_FILE = "model_info.json"
THRESHOLDS_FILE = "thresholds.json"
METRICS_FILE = "metrics.json"
MODEL_CARD_FILE = "model_card.md"
# The export stage's output, inside <artifacts>/export/.
EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
# The reference stage's output, inside <artifacts>/reference/ (see chestxray.model.ood).
REFERENCE_DIR = "reference"

# Which engine computes probabilities (Grad-CAM always uses Keras: it needs gradients).
# auto: ONNX Runtime when an exported model.onnx of this very model.keras is there, else Keras.
BACKENDS = ("auto", "onnx", "keras")
BACKEND_ENV = "CHESTXRAY_BACKEND"


@dataclass
class Prediction:
    predicted_class: str
    confidence: float
    probabilities: dict[str, float]
    low_confidence: bool
    warnings: list[str] = field(default_factory=list)
    ood_distance: float | None = None  # feature-space distance to the training X-rays; None when the check is off

    def to_dict(self) -> dict:
        return asdict(self)


class ModelNotFound(FileNotFoundError):
    """No trained model where one was expected; the message says how to get one."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (identifies a model.keras; the export stage stores it inside model.onnx)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: `backend`, else $CHESTXRAY_BACKEND, else auto (checked against BACKENDS)."""
    backend = (backend or os.environ.get(BACKEND_ENV, "") or "auto").strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={backend!r}: choose one of {', '.join(BACKENDS)}")
    return backend


def choose_backend(backend: str | None, onnx_path: str | Path | None) -> str:
    """'onnx' or 'keras': what serves a requested backend (see requested_backend) given an optional .onnx path."""
    backend = requested_backend(backend)
    exported = onnx_path is not None and Path(onnx_path).is_file()
    if backend == "onnx" and not exported:
        where = f"at {onnx_path}" if onnx_path is not None else "for this model (its run logged none)"
        raise ModelNotFound(f"{BACKEND_ENV}=onnx but there is no exported ONNX model {where} -- run the "
                            f"export stage (`dvc repro export`) or use {BACKEND_ENV}=auto")
    if backend == "auto":
        return "onnx" if exported else "keras"
    return backend


def _load_onnx(onnx_path: Path, keras_sha256: str, required: bool):
    """The ONNX runner for `onnx_path` if it was exported from the model.keras with this hash.

    A stale export (model.keras retrained, export not rerun) is an error when ONNX was asked for
    explicitly, and falls back to Keras (with a warning) under auto.
    """
    from chestxray.model.onnx_export import META_KERAS_SHA256, OnnxModelError, OnnxRunner

    runner = OnnxRunner.load(onnx_path)
    if runner.metadata.get(META_KERAS_SHA256) == keras_sha256:
        return runner
    message = (f"{onnx_path} was not exported from this model.keras (retrained since?) -- re-run the export "
               f"stage (`dvc repro export`)")
    if required:
        raise OnnxModelError(message)
    log.warning("%s; predicting with Keras", message)
    return None


def _load_reference(folder: str | Path | None,
                    keras_sha256: str) -> tuple[OodDetector | None, DriftReference | None, str | None]:
    """The OOD detector and drift reference in `folder` (its files read once) and None, or None, None
    and why the check is off (a stale reference is logged)."""
    reference = read_reference(folder) if folder is not None else None
    if reference is None:
        return None, None, None
    try:
        ood = OodDetector.from_reference(*reference, keras_sha256, folder)
    except OodReferenceError as exc:
        log.warning("'not a chest X-ray' check off: %s", exc)
        return None, None, str(exc)
    return ood, DriftReference.from_reference(*reference), None


def _pair(outputs: dict) -> tuple:
    return outputs["probabilities"], outputs["features"]


def _concat(parts: list[tuple[np.ndarray, np.ndarray | None]], n_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack per-batch (probabilities, features) pairs; features None if any batch had none."""
    if not parts:
        return np.zeros((0, n_classes), np.float32), None
    probabilities = np.concatenate([p for p, _ in parts])
    features = None if any(f is None for _, f in parts) else np.concatenate([f for _, f in parts])
    return probabilities, features


class Classifier:
    """A Keras model with its classes, input size, temperature, decision and low-confidence thresholds.

    Probabilities come from `onnx_runner` (ONNX Runtime) when one is given, else from the Keras model;
    `backend` says which. `model` is always the Keras model (Grad-CAM needs it). `ood` (an
    OodDetector) turns on the "not a chest X-ray" check; `ood_off_reason` says why it is off;
    `drift_reference` (from the same reference folder) is what the app's drift monitor compares
    with; `card` is the model card's Markdown. Everything is held in memory, so the files it was
    loaded from may go (a registry download does). Served
    probabilities are averaged over test-time augmentation views when `tta` is on, then divided by
    the temperature fitted on validation (thresholds.json); `outputs` gives the network's own output.
    """

    def __init__(self, model, info: dict, thresholds: dict | None = None, metrics: dict | None = None,
                 version: str = "unknown", onnx_runner=None, ood=None, ood_off_reason: str | None = None,
                 drift_reference=None, tta: bool = False, card: str | None = None,
                 keras_sha256: str | None = None):
        self.model = model
        # The model's identity: the sha256 of the pipeline's model.keras, which the export and the reference name.
        self.keras_sha256 = keras_sha256
        self.onnx_runner = onnx_runner
        self.backend = "onnx" if onnx_runner is not None else "keras"
        self.info = info
        self.classes: list[str] = list(info["classes"])
        self.image_size: int = int(info["image_size"])
        self.normal_class: str | None = info.get("normal_class")
        thresholds = thresholds or {}
        self.decision_threshold: float = float(thresholds.get("decision_threshold", 0.5))
        self.low_confidence_threshold: float = float(thresholds.get("low_confidence", 0.0))
        self.temperature: float = float(thresholds.get("temperature", 1.0))
        self.thresholds = thresholds
        self.tta = bool(tta)
        if "tta" in thresholds and bool(thresholds["tta"]) != self.tta:
            log.warning("thresholds and temperature were chosen %s test-time augmentation but it is %s now",
                        "with" if thresholds["tta"] else "without", "on" if self.tta else "off")
        self.metrics = metrics or {}
        self.version = version
        self.card = card
        # Graph mode: several times faster than eager calls for one image, traced once per batch shape.
        import tensorflow as tf

        from chestxray.model.build import with_features

        try:  # probabilities and pooled features from one forward pass
            two = with_features(model)
            self._forward = tf.function(lambda x: _pair(two(x, training=False)), reduce_retracing=True)
        except ValueError as exc:  # a model not made by build_model: probabilities only
            self._forward = tf.function(lambda x: (model(x, training=False), None), reduce_retracing=True)
            ood, ood_off_reason = None, str(exc)
        if ood is not None and onnx_runner is not None and onnx_runner.features_name is None:
            ood, ood_off_reason = None, (f"{onnx_runner.path} has no features output (exported before the check "
                                         "existed) -- re-run the export stage (`dvc repro export`)")
        self.ood = ood
        self.drift_reference = drift_reference if ood is not None else None
        self.ood_off_reason = None if ood is not None else (
            ood_off_reason or f"no reference was loaded with this model (the reference stage writes it to "
                              f"artifacts/{REFERENCE_DIR}/ and logs it to the run of the registered version) -- "
                              "run `dvc repro reference`")

    @classmethod
    def from_dirs(cls, model_dir: str | Path, evaluation_dir: str | Path | None = None,
                  version: str | None = None, onnx_path: str | Path | None = None,
                  backend: str | None = None, reference_dir: str | Path | None = None,
                  tta: bool = False, keras_sha256: str | None = None,
                  no_reference_reason: str | None = None) -> "Classifier":
        """Load model.keras + model_info.json from `model_dir`, thresholds, metrics, card from `evaluation_dir`.

        `backend` (auto | onnx | keras; None reads $CHESTXRAY_BACKEND, default auto) decides whether
        the exported `onnx_path` computes the probabilities; see `choose_backend`. `reference_dir`
        holds the "not a chest X-ray" reference (the check is off without one). `tta` averages
        every prediction over test-time augmentation views (4x the compute). The export and the
        reference must name this model.keras by its sha256; `keras_sha256` gives that name for a
        re-saved copy (a registered model), whose own bytes hash differently. `no_reference_reason`
        says why the check is off when no reference is found.
        """
        import keras

        import chestxray.model.layers  # noqa: F401  (registers PixelScaling for loading)

        model_dir = Path(model_dir)
        model_path = model_dir / MODEL_FILE
        if not model_path.is_file():
            raise ModelNotFound(f"no trained model at {model_path} -- run `dvc repro` (or `python main.py`) first")
        if not (model_dir / INFO_FILE).is_file():  # train writes it last: without it the output is incomplete
            raise ModelNotFound(f"the training output in {model_dir} is incomplete (no {INFO_FILE}: the train stage "
                                "did not finish) -- run `dvc repro` (or `python main.py`) again")
        info = json.loads((model_dir / INFO_FILE).read_text())
        thresholds = metrics = card = None
        if evaluation_dir is not None:
            evaluation_dir = Path(evaluation_dir)
            if (evaluation_dir / MODEL_CARD_FILE).is_file():
                card = (evaluation_dir / MODEL_CARD_FILE).read_text()
            if (evaluation_dir / THRESHOLDS_FILE).is_file():
                thresholds = json.loads((evaluation_dir / THRESHOLDS_FILE).read_text())
            if (evaluation_dir / METRICS_FILE).is_file():
                metrics = json.loads((evaluation_dir / METRICS_FILE).read_text())
        # $CHESTXRAY_BACKEND is for loaders that name an export (from_artifacts); without one (evaluate,
        # the export stage) only an explicit `backend` is checked, so the variable cannot break them.
        requested = requested_backend(backend) if backend or onnx_path is not None else "keras"
        chosen = choose_backend(requested, onnx_path)
        sha256 = keras_sha256 or file_sha256(model_path)
        if version is None:
            version = "sha256:" + sha256[:12]
        runner = _load_onnx(Path(onnx_path), sha256, required=requested == "onnx") if chosen == "onnx" else None
        model = keras.saving.load_model(model_path, compile=False)
        ood, drift_reference, off_reason = _load_reference(reference_dir, sha256)
        return cls(model, info, thresholds, metrics, version, onnx_runner=runner, ood=ood,
                   ood_off_reason=off_reason or no_reference_reason,
                   drift_reference=drift_reference, tta=tta, card=card, keras_sha256=sha256)

    @classmethod
    def from_artifacts(cls, root: str | Path = "artifacts", backend: str | None = None,
                       tta: bool = False) -> "Classifier":
        """Load what the pipeline wrote under `root` (training/, evaluation/, export/model.onnx and reference/)."""
        root = Path(root)
        return cls.from_dirs(root / "training", root / "evaluation", onnx_path=root / EXPORT_DIR / ONNX_FILE,
                             backend=backend, reference_dir=root / REFERENCE_DIR, tta=tta)

    @classmethod
    def from_registry(cls, name: str, alias: str = "champion", backend: str | None = None,
                      tta: bool = False) -> "Classifier":
        """Load the registered model version that carries `alias` (MLFLOW_TRACKING_URI picks the store).

        With it come its run's ONNX export and "not a chest X-ray" reference, so it serves like
        `from_artifacts`; a version registered before the evaluate stage tagged its model hash has
        neither (Keras only, check off).
        """
        import tempfile

        from chestxray.tracking import download_registered_model

        # The download is read into memory and removed: reloads do not pile model copies up on disk.
        with tempfile.TemporaryDirectory(prefix="chestxray-registry-") as folder:
            local, version, keras_sha256 = download_registered_model(name, alias, Path(folder))
            onnx_path = local / EXPORT_DIR / ONNX_FILE
            untagged = (f"{version} was registered without the hash of its model.keras, so its run's reference "
                        "cannot be matched to it -- register it again (`dvc repro -f -s evaluate`) and move the "
                        "alias to the new version")
            return cls.from_dirs(local / "model", local / "evaluation", version=version, backend=backend, tta=tta,
                                 onnx_path=onnx_path if onnx_path.is_file() else None,
                                 reference_dir=local / REFERENCE_DIR, keras_sha256=keras_sha256,
                                 no_reference_reason=None if keras_sha256 else untagged)

    def _run(self, batch) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and pooled features (None if unavailable) for one batch of prepared inputs."""
        if self.onnx_runner is not None:
            return self.onnx_runner.run(np.asarray(batch, dtype=np.float32))
        probabilities, features = self._forward(batch)
        return probabilities.numpy(), None if features is None else features.numpy()

    def _served(self, batch, tta: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Served probabilities for one batch (TTA-averaged if on, then temperature-scaled) and its features.

        The features (for the "not a chest X-ray" check) are always those of the image as uploaded.
        """
        tta = self.tta if tta is None else tta
        batch = np.asarray(batch, np.float32)
        probs, features = self._run(batch)
        if tta:
            probs = tta_probabilities(lambda view: self._run(view)[0], batch, original=probs)
        return apply_temperature(probs, self.temperature), features

    def outputs(self, batch: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """The network's own probabilities (N, C) and pooled features (N, D) or None: no augmentation, no
        temperature (what the ONNX export is checked on), for prepared inputs (N, size, size, 3)."""
        batch = np.asarray(batch, dtype=np.float32)
        return _concat([self._run(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)],
                       len(self.classes))

    def raw_probabilities(self, batch: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """The network's own probabilities (N, C): no augmentation, no temperature."""
        return self.outputs(batch, batch_size)[0]

    def served_outputs(self, batch: np.ndarray, batch_size: int = 32,
                       tta: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Served probabilities (N, C) and features for prepared inputs; `tta` overrides self.tta."""
        batch = np.asarray(batch, dtype=np.float32)
        return _concat([self._served(batch[i : i + batch_size], tta) for i in range(0, len(batch), batch_size)],
                       len(self.classes))

    def probabilities(self, batch: np.ndarray, batch_size: int = 32, tta: bool | None = None) -> np.ndarray:
        """Served class probabilities (N, C) for prepared inputs (N, size, size, 3); `tta` overrides self.tta."""
        return self.served_outputs(batch, batch_size, tta)[0]

    def outputs_for_files(self, paths: list[str], batch_size: int = 32,
                          on_batch=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Served probabilities and features for image files, streamed in batches through the shared preprocessing.

        `on_batch(inputs)` sees each batch of prepared inputs (e.g. to compute input statistics).
        """
        from chestxray.data.dataset import image_dataset

        out = []
        for batch in image_dataset(paths, self.image_size, batch_size):
            if on_batch is not None:
                on_batch(batch.numpy())
            out.append(self._served(batch.numpy()))
        return _concat(out, len(self.classes))

    def probabilities_for_files(self, paths: list[str], batch_size: int = 32) -> np.ndarray:
        """Served class probabilities (N, C) for image files, streamed through the shared preprocessing."""
        return self.outputs_for_files(paths, batch_size)[0]

    def predict_arrays(self, batch: np.ndarray) -> list[Prediction]:
        """Predictions for prepared inputs (N, size, size, 3), with `ood_distance` when the check is on."""
        probs, features = self.served_outputs(batch)
        return self.predictions(probs, self.ood.distances(features) if self.ood is not None else None)

    def predictions(self, probs: np.ndarray, distances: np.ndarray | None = None) -> list[Prediction]:
        """Predictions from probabilities (N, C) and, optionally, feature-space distances (N,)."""
        chosen = decide(probs, self.classes, self.normal_class, self.decision_threshold)
        distances = [None] * len(probs) if distances is None else distances
        results = []
        for row, k, distance in zip(probs, chosen, distances):
            confidence = float(row[k])
            low = confidence < self.low_confidence_threshold
            warnings = ["low_confidence"] if low else []
            distance = None if distance is None else round(float(distance), 4)  # as answered, and judged
            if distance is not None and self.ood is not None and self.ood.verdict(distance) != ACCEPT:
                warnings.append(OOD_WARNING)
            results.append(Prediction(
                predicted_class=self.classes[k],
                confidence=confidence,
                probabilities={c: float(p) for c, p in zip(self.classes, row)},
                low_confidence=low,
                warnings=warnings,
                ood_distance=distance,
            ))
        return results

    def ood_verdict(self, prediction: Prediction) -> str | None:
        """The check's "accept", "warn" or "refuse" for a prediction of this classifier; None when it is off."""
        if self.ood is None or prediction.ood_distance is None:
            return None
        return self.ood.verdict(prediction.ood_distance)

    def refuses(self, prediction: Prediction) -> bool:
        """True when the image is too far from the training X-rays to be classified at all."""
        return self.ood_verdict(prediction) == REFUSE

    def ood_info(self) -> dict:
        """Whether the "not a chest X-ray" check is on, its thresholds, or why it is off (for /model/info)."""
        if self.ood is None:
            return {"enabled": False, "reason": self.ood_off_reason}
        return {"enabled": True, "method": "Mahalanobis distance of the pooled backbone features to training X-rays",
                "warn_distance": self.ood.warn, "refuse_distance": self.ood.refuse, "chosen_on": "validation"}

    def prepare(self, data: bytes) -> np.ndarray:
        """Decode image bytes and map them to this model's input (raises ImageError on bad input)."""
        return prepare_image(decode_image(data), self.image_size)

    def predict_bytes(self, data: bytes) -> Prediction:
        """Predict one image given as file bytes (JPEG, PNG or DICOM)."""
        return self.predict_arrays(self.prepare(data)[None])[0]
