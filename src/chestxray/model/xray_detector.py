"""Is this a chest X-ray at all? A small network of its own that looks at the picture, not the classifier.

    detector = XrayDetector.load("artifacts/xray_check")       # None when the stage has not run
    scores = detector.scores(np.stack([detector_input(gray)]))  # P(chest X-ray) per image
    detector.accepts(scores[0])                                 # score >= the threshold the stage chose

A 64x64 grayscale thumbnail, standardised, goes through four 3x3 convolutions (16-64 channels), global average
pooling and a logistic output: enough to see the layout every chest film shares (lungs either
side of the spine, shoulders, diaphragm), and small enough to run in about a millisecond with
NumPy. The xray_check stage trains it with Keras on chest X-rays of every source against images
that are not chest X-rays (chestxray.evaluation.ood_samples); the weights are stored as plain
arrays (no pickle) and the served forward pass is NumPy. It is independent of the classifier:
retraining the classifier does not move it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from chestxray.model.blas import one_blas_thread

DETECTOR_FILE = "detector.npz"
INPUT_SIZE = 64
CHANNELS = (16, 32, 64, 64)  # 3x3 convolutions; a 2x2 max-pool after each but the last


def detector_input(gray: np.ndarray) -> np.ndarray:
    """The detector's (64, 64) float32 input from a grayscale image of any size: its thumbnail, standardised.

    Standardised (mean 0, sd 1) so that exposure does not decide: a dark or washed-out X-ray is still
    an X-ray (the population check says how its exposure differs). A prepared model input
    (size, size, 3) is accepted too: its first channel is the gray image.
    """
    gray = np.asarray(gray)
    if gray.ndim == 3:
        gray = gray[..., 0]
    thumb = cv2.resize(np.ascontiguousarray(gray, dtype=np.float32), (INPUT_SIZE, INPUT_SIZE),
                       interpolation=cv2.INTER_AREA)
    return (thumb - thumb.mean()) / (thumb.std() + 1.0)  # +1 grey level: a blank image stays all zeros


def build_keras_model(augment: bool = True):
    """The detector as a Keras model (for training); augmentation layers act only while training."""
    import keras

    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 1))
    x = inputs
    if augment:  # other hospitals frame and flip their films differently (exposure: detector_input standardises)
        x = keras.layers.RandomFlip("horizontal")(x)
        x = keras.layers.RandomZoom((-0.3, 0.3), fill_mode="constant")(x)  # a child's thorax fills less of the film
        x = keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant")(x)
    for i, channels in enumerate(CHANNELS):
        x = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        if i < len(CHANNELS) - 1:
            x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="out")(x)
    return keras.Model(inputs, outputs)


def _conv_relu(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """3x3 'same' convolution + ReLU of (N, H, W, C) with a Keras kernel (3, 3, C, F), as one matrix product."""
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # (N, H, W, C, 3, 3)
    columns = windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * h * w, 9 * c)
    return np.maximum(columns @ kernel.reshape(9 * c, -1) + bias, 0.0).reshape(n, h, w, -1)


@dataclass
class XrayDetector:
    """The network's weights (Keras layout) and the acceptance threshold on P(chest X-ray)."""

    kernels: list[np.ndarray]
    biases: list[np.ndarray]
    out_weights: np.ndarray  # (C,)
    out_bias: float
    threshold: float = 0.5

    @classmethod
    def from_keras(cls, model, threshold: float = 0.5) -> "XrayDetector":
        convs = [model.get_layer(f"conv{i}").get_weights() for i in range(len(CHANNELS))]
        out_w, out_b = model.get_layer("out").get_weights()
        return cls([k.astype(np.float32) for k, _ in convs], [b.astype(np.float32) for _, b in convs],
                   out_w[:, 0].astype(np.float32), float(out_b[0]), threshold)

    def scores(self, inputs: np.ndarray) -> np.ndarray:
        """P(chest X-ray) (N,) for detector inputs (N, 64, 64) (see detector_input)."""
        x = np.asarray(inputs, np.float32)[..., None]
        if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"detector inputs must be {INPUT_SIZE}x{INPUT_SIZE} (use detector_input)")
        with one_blas_thread():
            for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
                x = _conv_relu(x, kernel, bias)
                if i < len(self.kernels) - 1:
                    n, h, w, c = x.shape
                    x = x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
            logits = x.mean(axis=(1, 2)) @ self.out_weights + self.out_bias
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -50.0, 50.0)))

    @classmethod
    def fit(cls, xrays: np.ndarray, others: np.ndarray, epochs: int, seed: int,
            xray_weights: np.ndarray | None = None) -> "XrayDetector":
        """Train on detector inputs of chest X-rays and of other images (N, 64, 64); both classes weigh the same.

        `xray_weights` (N,) share the X-rays' half among them (e.g. each source equally); default: evenly.
        """
        import keras

        keras.utils.set_random_seed(seed)
        x = np.concatenate([xrays, others]).astype(np.float32)[..., None]
        y = np.concatenate([np.ones(len(xrays)), np.zeros(len(others))]).astype(np.float32)
        model = build_keras_model()
        model.compile(keras.optimizers.Adam(2e-3), "binary_crossentropy")
        xw = np.ones(len(xrays)) if xray_weights is None else np.asarray(xray_weights, float)
        xw = xw / xw.sum() * len(y) / 2
        sw = np.concatenate([xw, np.full(len(others), len(y) / (2 * len(others)))]).astype(np.float32)
        model.fit(x, y, sample_weight=sw, batch_size=64, epochs=epochs, shuffle=True, verbose=0)
        return cls.from_keras(model)

    def accepts(self, score: float) -> bool:
        """Whether an image with this score is classified (a chest X-ray) or refused."""
        return bool(score >= self.threshold)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"kernel{i}": k for i, k in enumerate(self.kernels)} | {f"bias{i}": b for i, b in enumerate(self.biases)}
        np.savez_compressed(folder / DETECTOR_FILE, out_weights=self.out_weights, out_bias=np.float32(self.out_bias),
                            threshold=np.float64(self.threshold), **arrays)
        return folder / DETECTOR_FILE

    @classmethod
    def load(cls, folder: str | Path) -> "XrayDetector | None":
        """The detector saved in `folder`; None if there is none."""
        path = Path(folder) / DETECTOR_FILE
        if not path.is_file():
            return None
        with np.load(path) as data:
            n = len(CHANNELS)
            return cls([data[f"kernel{i}"] for i in range(n)], [data[f"bias{i}"] for i in range(n)],
                       data["out_weights"], float(data["out_bias"]), float(data["threshold"]))
