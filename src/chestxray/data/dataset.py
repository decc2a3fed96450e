"""tf.data input pipelines over image files, through the shared preprocessing."""
from __future__ import annotations

from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from chestxray.data.preprocess import load_image

AUTOTUNE = tf.data.AUTOTUNE


def image_dataset(paths: Sequence[str], image_size: int, batch_size: int,
                  augment: keras.Sequential | None = None, labels: np.ndarray | None = None,
                  shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Batches of model inputs read through the shared preprocessing (chestxray.data.preprocess).

    With `labels` (one row per path, e.g. one-hot), batches of (images, labels); with `shuffle_seed`,
    the files are reshuffled every epoch. `augment` runs on every pass over the dataset, so each epoch
    sees other random views (the train stage's end-to-end mode; tests/test_end_to_end_training.py).
    """

    def read(path: bytes) -> np.ndarray:
        return load_image(path.decode(), image_size)

    items = list(paths) if labels is None else (list(paths), np.asarray(labels, np.float32))
    ds = tf.data.Dataset.from_tensor_slices(items)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(_on_images(lambda p: tf.ensure_shape(tf.numpy_function(read, [p], tf.float32),
                                                     (image_size, image_size, 3))),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(_on_images(lambda x: tf.clip_by_value(augment(x, training=True), 0.0, 255.0)))
    return ds.prefetch(AUTOTUNE)


def _on_images(fn: Callable[[tf.Tensor], tf.Tensor]) -> Callable:
    """`fn` applied to the images of a dataset element, which is the images alone or (images, labels)."""
    return lambda images, *rest: (fn(images), *rest) if rest else fn(images)
