"""Training augmentation on real X-rays: what it changes, what it never does, and that it is seeded."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from chestxray.data.dataset import image_dataset
from chestxray.model.training import RandomBlurNoise, augmentation

PARAMS = {"rotation_deg": 7, "shift": 0.05, "brightness": 0.2, "contrast": 0.3, "horizontal_flip": True,
          "blur": 0.005, "noise": 0.03}


@pytest.fixture(scope="module")
def normals(kermany224) -> list[str]:
    return [str(p) for p in sorted((kermany224 / "train" / "NORMAL").glob("*.jpeg"))[:8]]


@pytest.fixture(scope="module")
def batch(normals) -> np.ndarray:
    return next(iter(image_dataset(normals, 224, 8))).numpy()


def sharpness(image: np.ndarray) -> float:
    return float(ndimage.laplace(image[..., 0].astype(np.float64)).var())


def test_blur_softens_each_real_xray_by_its_own_amount_and_keeps_it_gray(batch):
    out = RandomBlurNoise(blur=0.01, noise=0.0, seed=1)(batch, training=True).numpy()
    before, after = np.array([sharpness(x) for x in batch]), np.array([sharpness(x) for x in out])
    assert (after < before).all()
    assert np.ptp(after / before) > 0.1  # sigma is drawn per image, not once per batch
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert abs(out.mean() - batch.mean()) < 1.0  # reflected edges: blurring does not darken the borders


def test_noise_adds_grain_of_varying_strength(batch):
    out = RandomBlurNoise(blur=0.0, noise=0.03, seed=1)(batch, training=True).numpy()
    sd = (out - batch)[..., 0].reshape(len(batch), -1).std(axis=1)
    assert (sd < 0.03 * 255 * 1.05).all() and sd.max() > 1.0 and np.ptp(sd) > 0.5


def test_not_training_changes_nothing(batch):
    assert np.array_equal(RandomBlurNoise(0.01, 0.03, seed=1)(batch, training=False), batch)


def test_augmented_dataset_is_seeded_and_in_range(normals):
    first = next(iter(image_dataset(normals, 224, 8, augmentation(PARAMS, seed=3)))).numpy()
    again = next(iter(image_dataset(normals, 224, 8, augmentation(PARAMS, seed=3)))).numpy()
    other = next(iter(image_dataset(normals, 224, 8, augmentation(PARAMS, seed=4)))).numpy()
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert first.min() >= 0.0 and first.max() <= 255.0 and first.shape == (8, 224, 224, 3)


def test_never_a_vertical_flip_and_nothing_asked_for_is_added():
    layers = augmentation(PARAMS, seed=0).layers
    flips = [layer for layer in layers if type(layer).__name__ == "RandomFlip"]
    assert [flip.mode for flip in flips] == ["horizontal"]
    assert augmentation({"rotation_deg": 0}, seed=0).layers == []
    assert not any(isinstance(layer, RandomBlurNoise) for layer in augmentation({"shift": 0.05}, seed=0).layers)
