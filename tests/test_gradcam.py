"""Grad-CAM: heatmaps at the original size, class-specific, for every supported backbone."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from chestxray.data.preprocess import decode_image
from chestxray.explain import gradcam
from chestxray.model.backbones import BACKBONES
from chestxray.model.build import build_model
from chestxray.model.network import Network
from chestxray.model.predictor import Predictor


@pytest.fixture(scope="module")
def clf(tiny_artifacts) -> Predictor:
    return Predictor.from_artifacts(tiny_artifacts)


@pytest.fixture(scope="module")
def gray(fullsize_dir) -> np.ndarray:
    return decode_image(sorted(fullsize_dir.glob("PNEUMONIA/*.jpeg"))[0].read_bytes())


def test_heatmap_and_overlay_at_original_size(clf, gray):
    cam = gradcam.explain(clf, gray, "PNEUMONIA")
    assert cam.heatmap.shape == gray.shape
    assert cam.heatmap.dtype == np.float32
    assert 0.0 <= cam.heatmap.min() and cam.heatmap.max() <= 1.0 + 1e-6
    assert cam.overlay.shape == (*gray.shape, 3)
    png = cam.png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape == (*gray.shape, 3)
    small = cv2.imdecode(np.frombuffer(cam.png(max_side=300), np.uint8), cv2.IMREAD_UNCHANGED)
    assert max(small.shape[:2]) == 300


def test_overlay_differs_between_classes(clf, gray):
    normal, pneumonia = (gradcam.explain(clf, gray, c) for c in ("NORMAL", "PNEUMONIA"))
    assert normal.class_name == "NORMAL" and pneumonia.class_name == "PNEUMONIA"
    assert not np.allclose(normal.heatmap, pneumonia.heatmap)
    assert np.abs(normal.overlay.astype(int) - pneumonia.overlay.astype(int)).mean() > 1.0


def test_unknown_class_is_refused(clf, gray):
    with pytest.raises(ValueError, match="unknown class"):
        gradcam.explain(clf, gray, "CANCER")


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone(backbone):
    """Built tiny with no weights: the feature map is found and the heatmap matches the original's size."""
    size = 75  # Xception's smallest input is 71
    model = build_model(backbone, size, 3, weights="none", dropout=0.0)
    clf = Predictor(Network(model), {"classes": ["A", "B", "C"], "image_size": size})
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (150, 210), dtype=np.uint8)
    heatmaps = [gradcam.explain(clf, original, c).heatmap for c in clf.classes]
    for heatmap in heatmaps:
        assert heatmap.shape == original.shape
        assert np.isfinite(heatmap).all()
    assert not (np.allclose(heatmaps[0], heatmaps[1]) and np.allclose(heatmaps[1], heatmaps[2]))
