"""The trained network: prepared inputs in, the network's own (raw) probabilities and pooled features out.

    network = Network.load(files.model_path, files.onnx_path, backend="auto")
    probabilities, features = network.outputs(batch)   # (N, C), (N, D) or None

Keras always holds the model (Grad-CAM needs its gradients); ONNX Runtime computes the outputs
instead when the backend is onnx. No temperature, no augmentation here: see chestxray.model.predictor.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from chestxray.hashing import file_sha256
from chestxray.model.artifacts import ModelNotFound

log = logging.getLogger(__name__)

# Which engine computes probabilities. auto: ONNX Runtime when an exported model.onnx of this very
# model.keras is there, else Keras.
BACKENDS = ("auto", "onnx", "keras")


def choose_backend(backend: str | None, onnx_path: str | Path | None) -> str:
    """'onnx' or 'keras': what serves the requested `backend` (None: auto) given an optional .onnx path."""
    backend = (backend or "auto").strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    exported = onnx_path is not None and Path(onnx_path).is_file()
    if backend == "onnx" and not exported:
        where = f"at {onnx_path}" if onnx_path is not None else "for this model (its run logged none)"
        raise ModelNotFound(f"the onnx backend was asked for but there is no exported ONNX model {where} -- run "
                            "the export stage (`dvc repro export`) or use the auto backend")
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


def _pair(outputs: dict) -> tuple:
    return outputs["probabilities"], outputs["features"]


class Network:
    """A Keras model, optionally run through ONNX Runtime; `backend` says which engine computes.

    `keras_sha256` names the pipeline's model.keras (the export and the reference name it too).
    `no_features` says why there are no pooled features (None when there are).
    """

    def __init__(self, model, onnx_runner=None, keras_sha256: str | None = None):
        # Graph mode: several times faster than eager calls for one image, traced once per batch shape.
        import tensorflow as tf

        from chestxray.model.build import with_features

        self.model = model
        self.onnx_runner = onnx_runner
        self.backend = "onnx" if onnx_runner is not None else "keras"
        self.keras_sha256 = keras_sha256
        self.no_features: str | None = None
        try:  # probabilities and pooled features from one forward pass
            two = with_features(model)
            self._forward = tf.function(lambda x: _pair(two(x, training=False)), reduce_retracing=True)
        except ValueError as exc:  # a model not made by build_model: probabilities only
            self._forward = tf.function(lambda x: (model(x, training=False), None), reduce_retracing=True)
            self.no_features = str(exc)
        if onnx_runner is not None and onnx_runner.features_name is None:
            self.no_features = (f"{onnx_runner.path} has no features output (exported before the check existed) "
                                "-- re-run the export stage (`dvc repro export`)")

    @classmethod
    def load(cls, model_path: str | Path, onnx_path: str | Path | None = None, backend: str | None = "auto",
             keras_sha256: str | None = None) -> "Network":
        """Load model.keras, and `onnx_path` when the backend (auto | onnx | keras) picks it.

        `keras_sha256` names a re-saved copy (a registered model, whose own bytes hash differently)
        by its pipeline model.keras; default: the file's own hash.
        """
        import keras

        import chestxray.model.layers  # noqa: F401  (registers PixelScaling for loading)

        chosen = choose_backend(backend, onnx_path)
        sha256 = keras_sha256 or file_sha256(model_path)
        runner = (_load_onnx(Path(onnx_path), sha256, required=(backend or "").lower() == "onnx")
                  if chosen == "onnx" else None)
        return cls(keras.saving.load_model(model_path, compile=False), runner, sha256)

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw probabilities (N, C) and pooled features (N, D) or None for one batch of prepared inputs."""
        batch = np.asarray(batch, dtype=np.float32)
        if self.onnx_runner is not None:
            return self.onnx_runner.run(batch)
        probabilities, features = self._forward(batch)
        return probabilities.numpy(), None if features is None else features.numpy()
