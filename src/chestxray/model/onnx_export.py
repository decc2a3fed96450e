"""ONNX, in one place: convert the Keras model, run it with ONNX Runtime, check the two agree.

    export_onnx(model, "artifacts/export/model.onnx", image_size=224, metadata={"keras_sha256": ...})
    runner = OnnxRunner.load("artifacts/export/model.onnx")
    probabilities = runner(batch)                      # (N, size, size, 3) float32 in [0, 255] -> (N, C)
    probabilities, features = runner.run(batch)        # and the pooled features (N, D), None in older exports

Why: on an ordinary 2-core CPU, ONNX Runtime runs the same network markedly faster than Keras.
The Keras model stays the source of truth (Grad-CAM needs its gradients); the ONNX file is a
derived artifact that must reproduce its probabilities (``check_onnx``) before anything serves it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Largest accepted |p_onnx - p_keras| over all images and classes (issue #4).
TOLERANCE = 1e-4
# ONNX opset written by the converter; onnxruntime >= 1.14 runs it.
OPSET = 17
INPUT_NAME = "image"
# Output names (build.with_features' dict keys). An export from before features has one unnamed output.
PROBABILITIES, FEATURES = "probabilities", "features"
# Largest accepted max |f_onnx - f_keras| / max |f_keras| for the features (they feed the "not a chest X-ray" check).
FEATURE_TOLERANCE = 1e-3
# Keys of the metadata stored inside the .onnx file (ONNX metadata_props).
META_KERAS_SHA256 = "chestxray.keras_sha256"


class OnnxModelError(RuntimeError):
    """An .onnx file that cannot be loaded or does not belong to the Keras model; the message says what to do."""


def cpu_threads() -> int:
    """Cores this process may use (the container's affinity, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def export_onnx(model, path: str | Path, image_size: int, metadata: dict[str, str] | None = None) -> Path:
    """Convert a Keras model (inputs (N, size, size, 3) float32) to ONNX at `path`, with `metadata` stored inside."""
    import onnx
    import tensorflow as tf

    import chestxray.model.layers  # noqa: F401  (PixelScaling is plain arithmetic: tf2onnx converts its ops)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    signature = [tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name=INPUT_NAME)]
    # Keras' own exporter: traces model(x, training=False) and hands it to tf2onnx (with its numpy 2 patches).
    model.export(str(path), format="onnx", input_signature=signature, opset_version=OPSET, verbose=False)
    if metadata:
        proto = onnx.load(str(path))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, str(value)
        onnx.save(proto, str(path))
    return path


class OnnxRunner:
    """An ONNX Runtime session for the classifier: prepared inputs in, class probabilities out."""

    def __init__(self, session, path: Path):
        self.session = session
        self.path = path
        self.input_name = session.get_inputs()[0].name
        names = [output.name for output in session.get_outputs()]
        self.output_name = PROBABILITIES if PROBABILITIES in names else names[0]
        self.features_name = FEATURES if FEATURES in names else None
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None) -> "OnnxRunner":
        """Open `path` for inference on the CPU; raise OnnxModelError (with what to do) if it cannot be loaded."""
        import onnxruntime as ort

        path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_threads()  # one image's convolutions across all cores
        options.inter_op_num_threads = 1  # a plain chain of layers: nothing to run side by side
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / NoSuchFile types
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise OnnxModelError(f"cannot load the ONNX model {path} ({reason}) -- re-run the export stage "
                                 f"(`dvc repro export`) or set CHESTXRAY_BACKEND=keras") from None
        return cls(session, path)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) for prepared inputs (N, size, size, 3)."""
        return self.run(batch)[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N, C) and pooled features (N, D) from one run; features None in an older export."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.features_name is None:
            return self.session.run([self.output_name], {self.input_name: batch})[0], None
        probabilities, features = self.session.run([self.output_name, self.features_name], {self.input_name: batch})
        return probabilities, features


@dataclass
class CheckResult:
    """How closely the ONNX model reproduces Keras on a set of images: probabilities and features."""

    max_abs_diff: float  # of the probabilities
    n_images: int
    mismatched: list[str] = field(default_factory=list)  # images whose predicted class differs
    tolerance: float = TOLERANCE
    # max |f_onnx - f_keras| / max |f_keras| of the pooled features; None when the ONNX model has none.
    features_max_rel_diff: float | None = None
    features_tolerance: float = FEATURE_TOLERANCE

    @property
    def passed(self) -> bool:
        features_ok = self.features_max_rel_diff is not None and self.features_max_rel_diff <= self.features_tolerance
        return self.n_images > 0 and self.max_abs_diff <= self.tolerance and not self.mismatched and features_ok

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def failure(self) -> str:
        """Why the check failed, in one line."""
        if self.n_images == 0:
            return "no images to check the ONNX model on"
        parts = []
        if self.max_abs_diff > self.tolerance:
            parts.append(f"max |p_onnx - p_keras| = {self.max_abs_diff:.3g} > {self.tolerance:g}")
        if self.mismatched:
            parts.append(f"predicted class differs on {len(self.mismatched)} of {self.n_images} images "
                         f"(e.g. {self.mismatched[0]})")
        if self.features_max_rel_diff is None:
            parts.append(f"the ONNX model has no '{FEATURES}' output")
        elif self.features_max_rel_diff > self.features_tolerance:
            parts.append(f"features differ by up to {self.features_max_rel_diff:.3g} of their scale "
                         f"> {self.features_tolerance:g}")
        return "ONNX model does not match Keras: " + "; ".join(parts)


def check_onnx(keras_fn, onnx_fn, batches: Iterable[tuple[list[str], np.ndarray]],
               tolerance: float = TOLERANCE) -> CheckResult:
    """Compare Keras and ONNX batch by batch on (names, inputs) pairs; the inputs are shared.

    Each function maps a batch to (probabilities, features or None).
    """
    worst, n, mismatched = 0.0, 0, []
    feature_gap, feature_scale, features_missing = 0.0, 0.0, False
    for names, batch in batches:
        (expected, keras_features), (actual, onnx_features) = keras_fn(batch), onnx_fn(batch)
        expected, actual = np.asarray(expected), np.asarray(actual)
        if expected.shape != actual.shape:
            raise OnnxModelError(f"ONNX output shape {actual.shape} differs from Keras' {expected.shape}")
        worst = max(worst, float(np.max(np.abs(expected - actual))) if len(batch) else 0.0)
        differ = np.argmax(expected, axis=1) != np.argmax(actual, axis=1)
        mismatched += [name for name, bad in zip(names, differ) if bad]
        n += len(batch)
        if onnx_features is None and keras_features is None:
            continue  # a model without features (not made by build_model): nothing to compare
        if onnx_features is None or keras_features is None or np.shape(onnx_features) != np.shape(keras_features):
            features_missing = True
        elif len(batch):
            feature_gap = max(feature_gap, float(np.max(np.abs(onnx_features - keras_features))))
            feature_scale = max(feature_scale, float(np.max(np.abs(keras_features))))
    rel = None if features_missing else feature_gap / (feature_scale or 1.0)
    return CheckResult(max_abs_diff=worst, n_images=n, mismatched=mismatched, tolerance=tolerance,
                       features_max_rel_diff=rel)


def write_check(result: CheckResult, path: str | Path, **extra) -> None:
    """Write the check as JSON (a DVC metrics file)."""
    Path(path).write_text(json.dumps({**result.to_dict(), **extra}, indent=2))
