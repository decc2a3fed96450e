"""The "is this a chest X-ray at all?" detector: its served NumPy forward pass, its files, its threshold rule."""
from __future__ import annotations

import numpy as np
import pytest

from chestxray.model.xray_detector import INPUT_SIZE, XrayDetector, build_keras_model, detector_input
from chestxray.pipeline.xray_check import best_threshold


@pytest.fixture(scope="module")
def keras_and_numpy():
    import keras

    keras.utils.set_random_seed(3)
    model = build_keras_model(augment=False)
    for layer in model.layers:  # weights that make every layer matter (default biases are zero)
        if layer.get_weights():
            layer.set_weights([np.random.default_rng(len(w.shape)).normal(0, 0.1, w.shape).astype(np.float32)
                               for w in layer.get_weights()])
    return model, XrayDetector.from_keras(model, threshold=0.4)


def test_served_numpy_forward_pass_is_the_trained_keras_network(keras_and_numpy, fullsize_dir):
    from chestxray.data.preprocess import decode_image

    model, detector = keras_and_numpy
    images = [decode_image(p.read_bytes()) for p in sorted(fullsize_dir.glob("*/*.jpeg"))[:6]]
    inputs = np.stack([detector_input(g) for g in images] + [np.full((INPUT_SIZE,) * 2, v, np.float32) for v in (-2, 3)])
    expected = model.predict(inputs[..., None], verbose=0)[:, 0]
    assert np.std(expected) > 0.01  # the comparison means something only if the answers differ
    np.testing.assert_allclose(detector.scores(inputs), expected, atol=1e-5)


def test_detector_input_is_the_same_from_the_original_or_the_prepared_model_input(fullsize_dir):
    from chestxray.data.preprocess import decode_image, prepare_image

    gray = decode_image(sorted(fullsize_dir.glob("*/*.jpeg"))[0].read_bytes())
    a, b = detector_input(gray), detector_input(prepare_image(gray, 224))
    assert a.shape == b.shape == (INPUT_SIZE, INPUT_SIZE)
    assert np.abs(a - b).mean() < 0.05  # in sd units: what the served path passes (the 224 input) is the original


def test_saved_detector_answers_the_same_and_keeps_its_threshold(keras_and_numpy, tmp_path):
    _, detector = keras_and_numpy
    inputs = np.random.default_rng(0).normal(0, 1, (4, INPUT_SIZE, INPUT_SIZE)).astype(np.float32)
    detector.save(tmp_path)
    loaded = XrayDetector.load(tmp_path)
    assert loaded.threshold == pytest.approx(0.4)
    np.testing.assert_allclose(loaded.scores(inputs), detector.scores(inputs), atol=1e-6)
    assert loaded.accepts(0.4) and not loaded.accepts(0.39)
    assert XrayDetector.load(tmp_path / "missing") is None


def test_exposure_does_not_decide(fullsize_dir):
    from chestxray.data.preprocess import decode_image

    gray = decode_image(sorted(fullsize_dir.glob("*/*.jpeg"))[0].read_bytes())
    darker = (gray * 0.4).astype(np.uint8)
    assert np.abs(detector_input(gray) - detector_input(darker)).mean() < 0.05


def test_wrong_input_size_is_refused_in_words(keras_and_numpy):
    with pytest.raises(ValueError, match="64x64"):
        keras_and_numpy[1].scores(np.zeros((1, 32, 32)))


def test_threshold_separates_out_of_fold_scores_and_prefers_the_middle():
    xrays, others = np.array([0.7, 0.8, 0.9, 0.95]), np.array([0.05, 0.1, 0.2, 0.3])
    t = best_threshold(xrays, others)
    assert 0.3 < t <= 0.7 and t == pytest.approx(0.5)  # every threshold in (0.3, 0.7] separates: the middle
    shifted = best_threshold(np.array([0.15, 0.2, 0.25]), np.array([0.01, 0.02, 0.05]))
    assert 0.05 < shifted <= 0.15  # detectors that score X-rays low still get a threshold that accepts them
    overlap = best_threshold(np.array([0.4, 0.9, 0.9, 0.9]), np.array([0.1, 0.1, 0.5, 0.1]))
    # Balanced accuracy 0.875 at (0.1, 0.4] (every X-ray in, one photo too) and at (0.5, 0.9]: the one nearer 0.5.
    assert overlap == pytest.approx(0.51)
