"""Training on a 2-core CPU: run the frozen part of the backbone once, then train on its cached output.

The backbone is cut at `fine_tune_from` (see backbones.py). Everything below the cut is frozen, so
its activations for each image (and for a few augmented views of each training image) are computed
once. Phase 1 trains the head on pooled features; phase 2 unfreezes the layers above the cut and
fine-tunes them with the head, all on the cached activations. The saved model is the whole network.

That is `train.mode: cached`, the default on a CPU. On GPUs (`end_to_end`, chestxray.pipeline.train) the
whole network trains on images, augmented afresh every epoch in the input pipeline, with the same cut:
`set_end_to_end_fine_tuning` freezes what the cached path never trains.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from chestxray.model.build import backbone_of, head_layers

AUTOTUNE = tf.data.AUTOTUNE
PROGRESS_EVERY_S = 30.0  # seconds between progress lines while caching activations


def augmentation(params: dict, seed: int) -> keras.Sequential:
    """Clinically plausible changes only: small rotation and shift, brightness, contrast, left-right flip,
    blur and noise.

    Never a vertical flip: an upside-down chest X-ray is not something the model will be shown.
    """
    layers = []
    if params.get("horizontal_flip", False):
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if params.get("rotation_deg", 0):
        layers.append(keras.layers.RandomRotation(params["rotation_deg"] / 360.0, fill_mode="constant", seed=seed))
    if params.get("shift", 0):
        layers.append(keras.layers.RandomTranslation(params["shift"], params["shift"], fill_mode="constant", seed=seed))
    if params.get("brightness", 0):
        layers.append(keras.layers.RandomBrightness(params["brightness"], value_range=(0, 255), seed=seed))
    if params.get("contrast", 0):
        layers.append(keras.layers.RandomContrast(params["contrast"], seed=seed))
    if params.get("blur", 0) or params.get("noise", 0):
        layers.append(RandomBlurNoise(params.get("blur", 0), params.get("noise", 0), seed=seed))
    return keras.Sequential(layers, name="augmentation")


class RandomBlurNoise(keras.layers.Layer):
    """Per image: gaussian blur of sigma up to `blur` x the image side, then noise of sd up to `noise` x 255.

    Why: in the Kermany training set normal images are sharper than pneumonia images (median Laplacian
    variance 152 vs 98 at 224 px), a shortcut a model learns; the robustness stage shows blur and noise
    then push normal images towards pneumonia. Images are grayscale repeated to 3 channels, so the
    first channel is changed and repeated. Each image draws its own sigma and sd, uniformly from 0.
    """

    def __init__(self, blur: float, noise: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.blur, self.noise = float(blur), float(noise)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        gray = tf.cast(images[..., :1], tf.float32)
        n = tf.shape(gray)[0]
        if self.blur:
            gray = self._blur(gray, keras.random.uniform((n,), 0.0, self.blur, seed=self.seed_generator))
        if self.noise:
            sd = keras.random.uniform((n, 1, 1, 1), 0.0, self.noise * 255.0, seed=self.seed_generator)
            gray = gray + sd * keras.random.normal(tf.shape(gray), seed=self.seed_generator)
        return tf.cast(tf.repeat(gray, 3, axis=-1), images.dtype)

    def _blur(self, gray, fraction):
        side = gray.shape[1]
        radius = max(1, int(np.ceil(3 * self.blur * side)))
        sigma = tf.maximum(fraction * side, 1e-3)[:, None]  # (n, 1); ~0 is the identity
        x = tf.range(-radius, radius + 1, dtype=tf.float32)[None, :]
        kernel = tf.exp(-0.5 * tf.square(x / sigma))
        kernel = tf.transpose(kernel / tf.reduce_sum(kernel, axis=1, keepdims=True))  # (taps, n)
        # The batch becomes the channels of one image, so a depthwise convolution gives each image its own kernel.
        maps = tf.transpose(gray, [3, 1, 2, 0])
        maps = tf.pad(maps, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
        maps = tf.nn.depthwise_conv2d(maps, kernel[:, None, :, None], [1, 1, 1, 1], "VALID")
        maps = tf.nn.depthwise_conv2d(maps, kernel[None, :, :, None], [1, 1, 1, 1], "VALID")
        return tf.transpose(maps, [3, 1, 2, 0])


@dataclass
class SplitModel:
    """The classifier cut in two: `bottom` (image -> cached activations) and `top` (activations -> probabilities)."""

    bottom: keras.Model
    top: keras.Model
    pooled: keras.Model  # activations -> pooled features with the top frozen (phase 1 input)
    head: keras.Model  # pooled features -> probabilities (phase 1)
    top_layers: list[keras.layers.Layer]


def split_model(model: keras.Model, fine_tune_from: str) -> SplitModel:
    """Cut a build_model() classifier at the input of backbone layer `fine_tune_from`; all parts share weights."""
    backbone = backbone_of(model)
    cut = backbone.get_layer(fine_tune_from).input
    below = keras.Model(backbone.input, cut)
    above = keras.Model(cut, backbone.output)

    image = keras.Input(model.input.shape[1:])
    bottom = keras.Model(image, below(model.get_layer("pixel_scaling")(image)), name="bottom")

    head_seq = head_layers(model)  # [pool, dropout, (hidden, dropout), probabilities]
    maps = keras.Input(cut.shape[1:])
    x = above(maps)
    for layer in head_seq:
        x = layer(x)
    top = keras.Model(maps, x, name="top")
    pooled = keras.Model(maps, head_seq[0](above(maps)), name="pooled")

    features = keras.Input(pooled.output.shape[1:])
    y = features
    for layer in head_seq[1:]:
        y = layer(y)
    head = keras.Model(features, y, name="head")
    return SplitModel(bottom, top, pooled, head, above.layers)


def set_fine_tuning(split: SplitModel, enabled: bool) -> None:
    """Train the layers above the cut (or freeze them). BatchNorm stays frozen: small batches would wreck its statistics."""
    for layer in split.top_layers:
        layer.trainable = enabled and not isinstance(layer, keras.layers.BatchNormalization)


def set_end_to_end_fine_tuning(model: keras.Model, split: SplitModel, enabled: bool) -> None:
    """The whole classifier trained as the cached path trains `split`: the backbone below the cut always
    frozen, the layers above it as set_fine_tuning sets them, the head trainable."""
    above = {id(layer) for layer in split.top_layers}
    for layer in backbone_of(model).layers:
        if id(layer) not in above:
            layer.trainable = False
    set_fine_tuning(split, enabled)


def inference_function(model: keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """`model(batch, training=False)` as a graph function, made once per model and reused.

    One function per model with a batch-size-free signature traces once: making a new tf.function on
    every call (and tracing again for the last, smaller batch) is what set off TensorFlow's
    "triggered tf.function retracing" warning.
    """
    run = _INFERENCE.get(model)
    if run is None:
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        ref = weakref.ref(model)  # a strong reference in the value would keep the model (the key) alive forever
        run = _INFERENCE[model] = tf.function(lambda batch: ref()(batch, training=False), input_signature=[spec])
    return run


_INFERENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cache_activations(bottom: keras.Model, ds: tf.data.Dataset, out: np.ndarray, label: str = "activations",
                      every_s: float = PROGRESS_EVERY_S) -> np.ndarray:
    """Run the frozen bottom over a dataset once, writing each batch into `out` (preallocated, float16).

    Filling one preallocated array keeps a single copy of the cache: collecting batches and
    concatenating them would hold two. float16 halves memory at no cost to accuracy here.
    A progress line (`label: images done of total`) every `every_s` seconds, flushed, so that it shows
    when the output goes to a file (as under `dvc repro`).
    """
    run = inference_function(bottom)  # graph mode: faster, no eager leaks
    filled, started = 0, time.monotonic()
    last = started
    for batch in ds:
        activations = run(tf.cast(batch, tf.float32)).numpy()
        out[filled:filled + len(activations)] = activations
        filled += len(activations)
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            print(f"{label}: {filled:,} of {len(out):,} images ({filled / max(len(out), 1):.0%}), "
                  f"{now - started:.0f}s", flush=True)
    if filled != len(out):
        raise ValueError(f"the dataset gave {filled} images for a cache of {len(out)}")
    return out


def run_in_batches(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """`model(x)` over a large cached array, one float32 slice at a time.

    Keras' predict() would first convert all of `x` to float32 tensors: twice the cache, and more.
    """
    run = inference_function(model)
    return np.concatenate([run(x[i:i + batch_size].astype(np.float32)).numpy()
                           for i in range(0, len(x), batch_size)])


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """'Balanced' weights: each class contributes equally to the loss."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    return {k: float(len(labels) / (num_classes * c)) if c else 0.0 for k, c in enumerate(counts)}


def make_loss(kind: str, gamma: float = 2.0) -> keras.losses.Loss:
    """'weighted_ce' (cross-entropy, used with class weights) or 'focal' (focal loss, no class weights)."""
    if kind == "focal":
        return keras.losses.CategoricalFocalCrossentropy(gamma=gamma)
    if kind == "weighted_ce":
        return keras.losses.CategoricalCrossentropy()
    raise ValueError(f"unknown train.loss {kind!r}; use 'weighted_ce' or 'focal'")


def arrays_dataset(x: np.ndarray, y: np.ndarray, num_classes: int, batch_size: int, shuffle_seed: int | None = None,
                   weights: dict[int, float] | None = None) -> tf.data.Dataset:
    """Cached activations (float16) and labels as a batched dataset, optionally shuffled and sample-weighted.

    Only indices go through tf.data; each batch is gathered from the one numpy array, so the cache is
    never copied (copying it into tensors and a shuffle buffer tripled peak memory).
    """
    onehot = keras.utils.to_categorical(y, num_classes).astype(np.float32)
    sample_weight = np.array([weights[k] for k in y], np.float32) if weights is not None else None

    def gather(idx: np.ndarray):
        idx = np.sort(idx)
        batch = (x[idx].astype(np.float32), onehot[idx])
        return batch + ((sample_weight[idx],) if sample_weight is not None else ())

    out_types = (tf.float32, tf.float32) + ((tf.float32,) if sample_weight is not None else ())
    ds = tf.data.Dataset.range(len(x))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)

    def load(idx):
        tensors = tf.numpy_function(gather, [idx], out_types)
        shapes = [(None, *x.shape[1:]), (None, num_classes), (None,)]
        return tuple(tf.ensure_shape(t, s) for t, s in zip(tensors, shapes))

    return ds.batch(batch_size).map(load).prefetch(AUTOTUNE)


class EpochLogger(keras.callbacks.Callback):
    """Collect per-epoch metrics across both phases and hand each epoch to `on_epoch` (e.g. MLflow)."""

    def __init__(self, phase: str, history: list[dict], on_epoch: Callable[[dict, int], None] | None = None):
        super().__init__()
        self.phase, self.history, self.on_epoch = phase, history, on_epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        lr = self.model.optimizer.learning_rate
        row = {"phase": self.phase, "epoch": len(self.history) + 1,
               **{k: float(v) for k, v in (logs or {}).items()},
               "learning_rate": float(lr.numpy() if hasattr(lr, "numpy") else lr)}
        self.history.append(row)
        if self.on_epoch:
            self.on_epoch(row, row["epoch"])
