"""Build the classifier: pixel scaling -> backbone -> pooling -> dropout -> (hidden) -> softmax."""
from __future__ import annotations

from pathlib import Path

import keras

from chestxray.model.backbones import get_backbone
from chestxray.model.layers import PixelScaling

PROBABILITIES = "probabilities"  # the output layer: float32 under every dtype policy (see build_model)


def _backbone_weights(weights: str | None) -> tuple[str | None, Path | None]:
    """Split one `weights` value into what keras.applications takes and a local file to load after."""
    if weights in (None, "none", "None", ""):
        return None, None
    if weights == "imagenet":
        return "imagenet", None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    return None, path


def _pretrained_backbone(spec, weights: str | None, image_size: int) -> keras.Model:
    """The backbone with one `weights` value: none, imagenet (downloaded once by Keras) or a .weights.h5 file."""
    keras_weights, weights_file = _backbone_weights(weights)
    try:
        base = spec.build(include_top=False, weights=keras_weights, input_shape=(image_size, image_size, 3))
    except Exception as exc:
        if keras_weights == "imagenet":
            raise RuntimeError(f"could not download ImageNet weights for {spec.name} ({exc.__class__.__name__})") from None
        raise
    if weights_file is not None:
        base.load_weights(weights_file)
    return base


def load_backbone(spec, weights: str | list[str] | None, image_size: int) -> keras.Model:
    """The backbone with the first of the `weights` alternatives that works (a local copy, then `imagenet`).

    The error, when none works, names every alternative and why it failed.
    """
    alternatives = weights if isinstance(weights, list) else [weights]
    failures = []
    for choice in alternatives:
        try:
            return _pretrained_backbone(spec, choice, image_size)
        except (FileNotFoundError, RuntimeError) as exc:
            failures.append(f"{choice}: {exc}")
    raise FileNotFoundError("no backbone weights could be loaded -- tried " + "; ".join(failures) +
                            " -- set base_model.weights in params.yaml to an existing .weights.h5 file, 'imagenet' "
                            "(needs internet once) or 'none'")


def build_model(
    backbone: str,
    image_size: int,
    num_classes: int,
    weights: str | list[str] | None = "imagenet",
    dropout: float = 0.3,
    dense_units: int = 0,
    truncate_before: str | None = None,
) -> keras.Model:
    """The full classifier. Input: (image_size, image_size, 3) float pixels in [0, 255]; output: class probabilities.

    `truncate_before` names a backbone layer: it and everything after it are dropped, so the features
    are the feature map that layer would have received (see backbones.Backbone.truncate_before).
    """
    spec = get_backbone(backbone)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    base = load_backbone(spec, weights, image_size)
    if truncate_before:
        base = keras.Model(base.input, base.get_layer(truncate_before).input)
    base.name = "backbone"
    x = PixelScaling(spec.scaling, name="pixel_scaling")(inputs)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    if dense_units:
        x = keras.layers.Dense(dense_units, activation="relu", name="hidden")(x)
        x = keras.layers.Dropout(dropout, name="hidden_dropout")(x)
    # float32 output even under mixed precision, so probabilities stay exact.
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name=PROBABILITIES)(x)
    return keras.Model(inputs, outputs, name=f"chestxray_{spec.name}")


def with_features(model: keras.Model) -> keras.Model:
    """The same network with two outputs from one forward pass: {"probabilities", "features"}.

    "features" are the pooled backbone features (the head's input), used to tell whether an image
    looks like the training X-rays at all (chestxray.model.ood). Raises ValueError for a model
    without the "pool" layer build_model puts there.
    """
    try:
        pooled = model.get_layer("pool").output
    except ValueError:
        raise ValueError(f"model {model.name} has no 'pool' layer: no features for the "
                         "'not a chest X-ray' check") from None
    return keras.Model(model.input, {"probabilities": model.output, "features": pooled}, name=f"{model.name}_features")


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone model inside a classifier built by build_model."""
    return model.get_layer("backbone")


def head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers after the backbone (pooling to probabilities), in order."""
    names = [layer.name for layer in model.layers]
    return model.layers[names.index("backbone") + 1 :]
