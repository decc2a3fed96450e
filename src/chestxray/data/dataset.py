"""tf.data input pipelines over image files, through the shared preprocessing."""
from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from chestxray.data.preprocess import load_image

AUTOTUNE = tf.data.AUTOTUNE


def image_dataset(paths: Sequence[str], image_size: int, batch_size: int,
                  augment: keras.Sequential | None = None) -> tf.data.Dataset:
    """Batches of model inputs read through the shared preprocessing (chestxray.data.preprocess)."""

    def read(path: bytes) -> np.ndarray:
        return load_image(path.decode(), image_size)

    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    ds = ds.map(lambda p: tf.ensure_shape(tf.numpy_function(read, [p], tf.float32), (image_size, image_size, 3)),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x: tf.clip_by_value(augment(x, training=True), 0.0, 255.0))
    return ds.prefetch(AUTOTUNE)
