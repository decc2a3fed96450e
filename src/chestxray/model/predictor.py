"""One prediction path: image bytes (or files, or prepared arrays) -> prediction with its verdict.

    predictor = Predictor.from_artifacts("artifacts")              # what `dvc repro` produced
    results = predictor.predict_images([data, ...])                 # read -> prepare -> is it an X-ray? -> predict
    results[0].prediction, results[0].error                         # error: not accepted, or not a chest X-ray

The parts, each in its own module: the network (chestxray.model.network: Keras or ONNX Runtime,
raw probabilities and features), the calibration (chestxray.model.calibration: temperature,
decision and low-confidence thresholds), the "not a chest X-ray" check (chestxray.model.not_xray: its
own detector, asked before the network; the only check that refuses), the population check (chestxray.model.population: is the
image like the X-rays the model was validated on? it warns, never refuses) and the acceptance rules
for images (chestxray.data.acceptance). The registry's champion loads
through chestxray.model.registry.

Probabilities are "raw" (the network's own: no augmentation, no temperature) or "served" (averaged
over test-time augmentation views when `tta` is on, then divided by the temperature): the method
names say which.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from chestxray.data.acceptance import ImageRejected, read_image
from chestxray.data.preprocess import decode_image, prepare_image
from chestxray.evaluation.drift import INTENSITY_MEAN, INTENSITY_STD, input_signals
from chestxray.model.artifacts import ModelFiles, read_evaluation, read_model_info
from chestxray.model.calibration import Calibration
from chestxray.model.network import Network
from chestxray.model.not_xray import ChestXrayCheck
from chestxray.model.population import PopulationCheck
from chestxray.model.tta import tta_probabilities

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    predicted_class: str
    confidence: float
    probabilities: dict[str, float]  # served
    low_confidence: bool
    warnings: list[str] = field(default_factory=list)
    # Each warning code's words for a clinician (the page, the batch CSV and Gemini's prompt show them).
    warning_messages: dict[str, str] = field(default_factory=dict)
    ood_distance: float | None = None  # feature-space distance to the training X-rays; None when the check is off
    xray_score: float | None = None  # the detector's P(chest X-ray); None when the "not a chest X-ray" check is off
    verdict: str | None = None  # the population check's "accept" | "warn"; None when it is off

    def to_dict(self) -> dict:
        """The answer as the API and the batch command give it (a refusal is an error, not a field)."""
        answer = asdict(self)
        del answer["verdict"]
        return answer


@dataclass
class Result:
    """One image through the whole path: its prediction, or why it gets none."""

    prediction: Prediction | None = None
    error: ImageRejected | None = None  # not accepted (unreadable, too small, ...)
    image: np.ndarray | None = None  # the decoded grayscale original (for Grad-CAM)


def _concat(parts: list[tuple[np.ndarray, np.ndarray | None]], n_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack per-batch (probabilities, features) pairs; features None if any batch had none."""
    if not parts:
        return np.zeros((0, n_classes), np.float32), None
    probabilities = np.concatenate([p for p, _ in parts])
    features = None if any(f is None for _, f in parts) else np.concatenate([f for _, f in parts])
    return probabilities, features


class Predictor:
    """A network with its classes and input size, its calibration, its "not a chest X-ray" and population checks.

    Everything is held in memory, so the files it was loaded from may go (a registry download does).
    `info` is model_info.json, `metrics` the test metrics, `card` the model card's Markdown.
    """

    def __init__(self, network: Network, info: dict, calibration: Calibration | None = None,
                 population_check: PopulationCheck | None = None, version: str | None = None,
                 metrics: dict | None = None, card: str | None = None, tta: bool = False,
                 xray_check: ChestXrayCheck | None = None):
        self.network = network
        self.info = info
        self.classes: list[str] = list(info["classes"])
        self.image_size: int = int(info["image_size"])
        self.normal_class: str | None = info.get("normal_class")
        self.calibration = calibration or Calibration()
        if population_check is None or (population_check.on and network.no_features):
            population_check = PopulationCheck(off_reason=network.no_features)
        self.population_check = population_check
        self.xray_check = xray_check or ChestXrayCheck()
        self.tta = bool(tta)
        chosen = self.calibration.chosen_with_tta()
        if chosen is not None and chosen != self.tta:
            log.warning("thresholds and temperature were chosen %s test-time augmentation but it is %s now",
                        "with" if chosen else "without", "on" if self.tta else "off")
        sha256 = network.keras_sha256
        self.version = version or ("sha256:" + sha256[:12] if sha256 else "unknown")
        self.metrics = metrics or {}
        self.card = card

    @classmethod
    def load(cls, files: ModelFiles, backend: str | None = "auto", tta: bool = False, version: str | None = None,
             keras_sha256: str | None = None, no_reference_reason: str | None = None) -> "Predictor":
        """Load a predictor from its files (see ModelFiles).

        `backend` (auto | onnx | keras) decides whether the export computes; see network.choose_backend.
        `tta` averages every served prediction over test-time augmentation views (4x the compute).
        `keras_sha256` names a re-saved model (a registered one) by its pipeline model.keras, which
        the export and the reference name; `no_reference_reason` says why the check is off when no
        reference is found (the population check is then off).
        """
        info = read_model_info(files.model_dir)
        thresholds, metrics, card = read_evaluation(files.evaluation_dir)
        network = Network.load(files.model_path, files.onnx_path, backend, keras_sha256)
        population = PopulationCheck.load(files.reference_dir, network.keras_sha256, no_reference_reason)
        return cls(network, info, Calibration.from_thresholds(thresholds), population, version, metrics, card, tta,
                   ChestXrayCheck.load(files.xray_check_dir))

    @classmethod
    def from_artifacts(cls, root: str | Path = "artifacts", backend: str | None = "auto",
                       tta: bool = False) -> "Predictor":
        """Load what the pipeline wrote under `root` (training/, evaluation/, export/, reference/, xray_check/)."""
        return cls.load(ModelFiles.from_artifacts(root), backend, tta)

    # --- what it is --------------------------------------------------------------------------

    @property
    def model(self):
        """The Keras model (Grad-CAM needs it whatever the backend)."""
        return self.network.model

    @property
    def backend(self) -> str:
        return self.network.backend

    @property
    def keras_sha256(self) -> str | None:
        return self.network.keras_sha256

    # --- probabilities -----------------------------------------------------------------------

    def _served_batch(self, batch: np.ndarray, tta: bool | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Served probabilities and features for one batch; features always of the image as given."""
        batch = np.asarray(batch, np.float32)
        probs, features = self.network.outputs(batch)
        if self.tta if tta is None else tta:
            probs = tta_probabilities(lambda view: self.network.outputs(view)[0], batch, original=probs)
        return self.calibration.apply(probs), features

    def raw_outputs(self, batch: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw probabilities (N, C) and pooled features (N, D) or None for prepared inputs (N, size, size, 3)."""
        batch = np.asarray(batch, np.float32)
        return _concat([self.network.outputs(batch[i : i + batch_size]) for i in range(0, len(batch), batch_size)],
                       len(self.classes))

    def raw_probabilities(self, batch: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Raw probabilities (N, C): what the registered and exported models output."""
        return self.raw_outputs(batch, batch_size)[0]

    def served_outputs(self, batch: np.ndarray, batch_size: int = 32,
                       tta: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Served probabilities (N, C) and features for prepared inputs; `tta` overrides the predictor's."""
        batch = np.asarray(batch, np.float32)
        return _concat([self._served_batch(batch[i : i + batch_size], tta) for i in range(0, len(batch), batch_size)],
                       len(self.classes))

    def served_probabilities(self, batch: np.ndarray, batch_size: int = 32, tta: bool | None = None) -> np.ndarray:
        """Served probabilities (N, C) for prepared inputs (N, size, size, 3)."""
        return self.served_outputs(batch, batch_size, tta)[0]

    def served_outputs_for_files(self, paths: list[str], batch_size: int = 32,
                                 on_batch: Callable[[np.ndarray], object] | None = None
                                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """Served probabilities and features for image files, streamed through the training data reader.

        `on_batch(inputs)` sees each batch of prepared inputs (e.g. to compute input statistics).
        """
        from chestxray.data.dataset import image_dataset

        out = []
        for batch in image_dataset(paths, self.image_size, batch_size):
            if on_batch is not None:
                on_batch(batch.numpy())
            out.append(self._served_batch(batch.numpy(), None))
        return _concat(out, len(self.classes))

    def served_probabilities_for_files(self, paths: list[str], batch_size: int = 32) -> np.ndarray:
        """Served probabilities (N, C) for image files."""
        return self.served_outputs_for_files(paths, batch_size)[0]

    # --- predictions -------------------------------------------------------------------------

    def low_confidence_message(self, confidence: float) -> str:
        """The words of the "low_confidence" warning."""
        return (f"The model is unsure about this image: its confidence ({confidence:.0%}) is below "
                f"{self.calibration.low_confidence_threshold:.0%}, the level chosen on validation X-rays under which "
                "its answers were not accurate enough. Do not rely on this output.")

    def predictions(self, served: np.ndarray, distances: np.ndarray | None = None,
                    signals: dict[str, np.ndarray] | None = None) -> list[Prediction]:
        """Predictions from served probabilities (N, C) and, when the check is on, feature distances (N,).

        `signals` (evaluation.drift.input_signals of the prepared inputs) let a population warning say
        whether the image's exposure differs from the reference X-rays.
        """
        chosen = self.calibration.decide(served, self.classes, self.normal_class)
        n = len(served)
        distances = [None] * n if distances is None else distances
        signals = signals or {}
        means = signals.get(INTENSITY_MEAN.name, [None] * n)
        stds = signals.get(INTENSITY_STD.name, [None] * n)
        results = []
        for row, k, distance, mean, std in zip(served, chosen, distances, means, stds):
            confidence = float(row[k])
            low = self.calibration.is_low_confidence(confidence)
            distance = None if distance is None else round(float(distance), 4)  # as answered, and judged
            messages = {"low_confidence": self.low_confidence_message(confidence)} if low else {}
            messages |= self.population_check.warnings(distance, None if mean is None else float(mean),
                                                       None if std is None else float(std))
            results.append(Prediction(predicted_class=self.classes[k], confidence=confidence,
                                      probabilities={c: float(p) for c, p in zip(self.classes, row)},
                                      low_confidence=low, warnings=list(messages), warning_messages=messages,
                                      ood_distance=distance, verdict=self.population_check.verdict(distance)))
        return results

    def predict_arrays(self, inputs: np.ndarray) -> list[Prediction]:
        """Predictions for prepared inputs (N, size, size, 3), with distance and verdict when the check is on."""
        served, features = self.served_outputs(inputs)
        return self.predictions(served, self.population_check.distances(features), input_signals(inputs))

    def prepare(self, data: bytes) -> np.ndarray:
        """Decode image bytes and map them to this model's input (ImageError on bad input; no acceptance rules)."""
        return prepare_image(decode_image(data), self.image_size)

    def predict_images(self, images: Sequence[bytes | str | Path],
                       observe: Callable[[np.ndarray, list[int], list[Prediction]], object] | None = None
                       ) -> list[Result]:
        """Each image (bytes or a file) read and checked, the accepted ones predicted in one batch, in order.

        What the detector does not take for a chest X-ray gets the 422 `not_a_chest_xray` error and never
        reaches the network; an X-ray outside the validated population is predicted, with the warning.
        `observe(inputs, longer sides, predictions)` sees every predicted batch (the drift monitor).
        """
        results = []
        for image in images:
            try:
                results.append(Result(image=read_image(image)))
            except ImageRejected as exc:
                results.append(Result(error=exc))
        accepted = [r for r in results if r.error is None]
        if not accepted:
            return results
        inputs = np.stack([prepare_image(r.image, self.image_size) for r in accepted])
        scores = self.xray_check.scores(inputs)
        if scores is not None:
            for result, score in zip(accepted, scores, strict=True):
                result.error = self.xray_check.refusal(float(score))
            keep = np.array([r.error is None for r in accepted])
            accepted, inputs, scores = [r for r in accepted if r.error is None], inputs[keep], scores[keep]
        if not accepted:
            return results
        predictions = self.predict_arrays(inputs)
        if observe is not None:
            observe(inputs, [max(r.image.shape[:2]) for r in accepted], predictions)
        for i, (result, prediction) in enumerate(zip(accepted, predictions, strict=True)):
            prediction.xray_score = None if scores is None else round(float(scores[i]), 4)
            result.prediction = prediction
        return results

    def predict_bytes(self, data: bytes) -> Prediction:
        """The prediction for one image's bytes (JPEG, PNG or DICOM); ImageRejected if it is not accepted."""
        result = self.predict_images([data])[0]
        if result.prediction is None:
            raise result.error
        return result.prediction
