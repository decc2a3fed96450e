"""base_model.weights: one value or an ordered list of alternatives (a local copy first, then `imagenet`)."""
from __future__ import annotations

import numpy as np
import pytest

from chestxray.model.backbones import get_backbone
from chestxray.model.build import load_backbone


def _first_kernel(model) -> np.ndarray:
    return next(w for w in model.weights if "kernel" in w.path).numpy()


def test_the_first_alternative_that_exists_is_loaded(xception_weights, tmp_path):
    spec = get_backbone("xception")
    missing = str(tmp_path / "not-here.weights.h5")
    chosen = load_backbone(spec, [missing, str(xception_weights), "none"], 96)
    direct = load_backbone(spec, str(xception_weights), 96)
    untrained = load_backbone(spec, "none", 96)
    assert np.array_equal(_first_kernel(chosen), _first_kernel(direct))
    assert not np.array_equal(_first_kernel(chosen), _first_kernel(untrained))


def test_when_nothing_works_the_error_names_every_place_tried(tmp_path):
    first, second = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    with pytest.raises(FileNotFoundError) as error:
        load_backbone(get_backbone("mobilenetv2"), [str(first), str(second)], 96)
    message = str(error.value)
    assert str(first) in message and str(second) in message
    assert "set base_model.weights" in message and "imagenet" in message
