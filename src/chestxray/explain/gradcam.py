"""Grad-CAM (Selvaraju et al. 2017), as in the Keras "Grad-CAM class activation visualization" example.

The classifier is ``pixel_scaling -> backbone -> head``, and for every supported backbone the
backbone's output *is* its last convolutional feature map. So the feature map is found without
naming any layer: run ``features = backbone(pixel_scaling(x))`` and the head on top of it inside one
GradientTape, then weigh each feature channel by the mean gradient of the class score.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import cv2
import numpy as np

from chestxray.model.build import backbone_of, head_layers

DEFAULT_ALPHA = 0.4
# One traced heatmap function per loaded model (tracing costs seconds; each call after is fast).
_FUNCTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class GradCam:
    class_name: str
    heatmap: np.ndarray  # (H, W) float32 in [0, 1] at the original image's size
    overlay: np.ndarray  # (H, W, 3) BGR uint8: the heatmap over the original image

    def png(self, max_side: int | None = None) -> bytes:
        """The overlay as PNG bytes (full size, or shrunk to `max_side`)."""
        return to_png(self.overlay, max_side)


def _feature_and_head(model):
    """The pieces Grad-CAM runs: the pixel scaling layer, the backbone, the head layers."""
    backbone = backbone_of(model)
    if len(backbone.output.shape) != 4:
        raise ValueError(f"backbone output has shape {backbone.output.shape}; Grad-CAM needs a conv feature map")
    return model.get_layer("pixel_scaling"), backbone, head_layers(model)


def _heatmap_fn(model):
    """A compiled (traced once per model) function: prepared image batch + class index -> coarse heatmap."""
    import tensorflow as tf

    if model in _FUNCTIONS:
        return _FUNCTIONS[model]
    scaling, backbone, head = _feature_and_head(model)

    @tf.function(reduce_retracing=True)
    def heatmap(x, class_index):
        with tf.GradientTape() as tape:
            features = backbone(scaling(x), training=False)
            tape.watch(features)
            y = features
            for layer in head:
                y = layer(y, training=False)
            score = tf.gather(y, class_index, axis=1)
        grads = tape.gradient(score, features)  # (1, h, w, k)
        weights = tf.reduce_mean(grads, axis=(0, 1, 2))  # one weight per feature channel
        cam = tf.nn.relu(tf.reduce_sum(features[0] * weights, axis=-1))
        return cam / (tf.reduce_max(cam) + 1e-8), y[0]

    _FUNCTIONS[model] = heatmap
    return heatmap


def compute_heatmap(model, image: np.ndarray, class_index: int) -> np.ndarray:
    """Coarse Grad-CAM heatmap (h, w) in [0, 1] for one prepared input (size, size, 3) and a class index."""
    import tensorflow as tf

    x = tf.convert_to_tensor(np.asarray(image, np.float32)[None])
    cam, _ = _heatmap_fn(model)(x, tf.constant(int(class_index)))
    return cam.numpy().astype(np.float32)


def overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = DEFAULT_ALPHA) -> np.ndarray:
    """Jet-colored heatmap blended over the grayscale original, at the original's size (BGR uint8)."""
    height, width = gray.shape[:2]
    if heatmap.shape != (height, width):
        heatmap = cv2.resize(heatmap, (width, height), interpolation=cv2.INTER_LINEAR)
    colored = cv2.applyColorMap(np.uint8(np.clip(heatmap, 0, 1) * 255), cv2.COLORMAP_JET)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(colored, alpha, base, 1.0 - alpha, 0.0)


def to_png(image: np.ndarray, max_side: int | None = None) -> bytes:
    """PNG bytes of an image, optionally shrunk so its longer side is at most `max_side`."""
    if max_side and max(image.shape[:2]) > max_side:
        scale = max_side / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def explain(clf, gray: np.ndarray, class_name: str, alpha: float = DEFAULT_ALPHA) -> GradCam:
    """Grad-CAM for `class_name` on a decoded grayscale original, using a loaded Predictor `clf`."""
    from chestxray.data.preprocess import prepare_image

    if class_name not in clf.classes:
        raise ValueError(f"unknown class {class_name!r}; the model knows: {', '.join(clf.classes)}")
    cam = compute_heatmap(clf.model, prepare_image(gray, clf.image_size), clf.classes.index(class_name))
    height, width = gray.shape[:2]
    heatmap = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
    return GradCam(class_name, heatmap, overlay(gray, heatmap, alpha))
