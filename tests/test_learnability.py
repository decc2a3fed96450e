"""A model that must learn: the real ingest -> prepare_base_model -> train code on an easy real-image task.

The other pipeline tests train tiny models for a few epochs and check that every stage runs, not
that anything was learnt: a bug that breaks learning (labels shuffled against their images, a
wrong class order, frozen weights, features cached from the wrong images) would pass them all.
Here the task is one any working training loop solves: real Kermany films, SHARP as they are
against BLURRED (a strong Gaussian blur of *other* films, so no image and its copy straddle the
splits). Held-out test images, scored by the served Predictor, must be told apart (ROC AUC) and
with the labels the right way round.

The backbone is the real ImageNet Xception (the project default) at 96 px, not a MobileNetV2 from
scratch: the train stage keeps the bottom of the backbone frozen and caches its activations, and an
untrained MobileNetV2 in inference mode shrinks activations ~10x per block (1e-10 at its cut,
block_16_expand), which the float16 cache stores as exact zeros, so with weights "none" the head
sees the same all-zero features for every image and cannot learn anything (measured: val AUC 0.5,
one constant probability for all test images).
"""
from __future__ import annotations

import json

import pandas as pd
import pytest

from helpers import LEARN_PER_CLASS, assert_tells_blurred_from_sharp, train_and_score


@pytest.mark.slow
def test_the_train_stage_learns_sharp_from_blurred_films(tmp_path, kermany224, xception_weights):
    test, probs, classes = train_and_score(kermany224, xception_weights, tmp_path)
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert classes == report["classes"] == ["BLURRED", "SHARP"]
    manifest = pd.read_csv(tmp_path / "data" / "manifest.csv")
    assert not set(test.path) & set(manifest.query("split != 'test'").path)  # held out
    assert test.label.value_counts().to_dict() == {"BLURRED": LEARN_PER_CLASS * 3 // 10,
                                                   "SHARP": LEARN_PER_CLASS * 3 // 10}
    assert_tells_blurred_from_sharp(test, probs, classes)
