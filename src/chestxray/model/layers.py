"""Custom layers saved inside the .keras file."""
from __future__ import annotations

import keras
from keras import ops

_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="chestxray")
class PixelScaling(keras.layers.Layer):
    """Scale [0, 255] pixels the way a backbone's ImageNet weights expect (see backbones.Backbone.scaling)."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("tf", "torch", "caffe", "raw"):
            raise ValueError(f"unknown pixel scaling {mode!r}")
        self.mode = mode

    def call(self, x):
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x / 255.0 - ops.array(_IMAGENET_MEAN_RGB)) / ops.array(_IMAGENET_STD_RGB)
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.array(_CAFFE_MEAN_BGR)
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}
