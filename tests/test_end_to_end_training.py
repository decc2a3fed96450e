"""train.mode end_to_end: the train stage fine-tuning the whole network on images augmented in the input pipeline.

On GPUs (`train.mode: auto`) the train stage skips the CPU's activation cache: phase 1 trains the head with
the whole backbone frozen, phase 2 the layers from fine_tune_from up, both on images read and augmented
afresh every epoch by tf.data. Here it is forced on the CPU, on the sharp-vs-blurred task of
test_learnability.py (real Kermany films, real ImageNet Xception, 96 px), small enough for 2 cores.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from helpers import ROOT, assert_tells_blurred_from_sharp, train_and_score

AUGMENT = {"rotation_deg": 7, "shift": 0.05, "brightness": 0.2, "contrast": 0.3, "horizontal_flip": True}
E2E = {"mode": "end_to_end", "head_epochs": 4, "fine_tune_epochs": 2, "augment": AUGMENT}


def test_auto_mode_is_end_to_end_on_gpus_and_cached_on_cpus():
    from chestxray.model.distribute import CACHED, END_TO_END, training_mode

    assert training_mode("auto", "gpu") == END_TO_END
    assert training_mode("auto", "cpu") == CACHED
    assert training_mode("cached", "gpu") == CACHED and training_mode("end_to_end", "cpu") == END_TO_END
    with pytest.raises(ValueError, match=r"^train.mode is 'bogus': use one of auto, cached, end_to_end$"):
        training_mode("bogus", "cpu")


def _epochs(ds, n: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) of `n` passes over a labelled dataset, as numpy arrays."""
    return [tuple(np.concatenate([t.numpy() for t in parts]) for parts in zip(*ds)) for _ in range(n)]


def test_the_input_pipeline_augments_afresh_every_epoch(kermany224):
    """Two passes over the same training dataset give other random views of every image, and a dataset made
    again with the same seed repeats them (runs are reproducible)."""
    from chestxray.data.dataset import image_dataset
    from chestxray.model.training import augmentation

    paths = [str(p) for p in sorted((kermany224 / "train" / "NORMAL").glob("*.jpeg"))[:8]]
    labels = np.eye(2)[[0, 1] * 4]
    plain = _epochs(image_dataset(paths, 64, 4, labels=labels), 1)[0][0]

    def augmented():
        return _epochs(image_dataset(paths, 64, 4, augmentation(AUGMENT, seed=1), labels=labels))

    (first, y1), (second, y2) = augmented()
    assert (y1 == labels).all() and (y2 == labels).all()
    changed = [np.abs(a - b).max() for a, b in zip(first, second)]
    assert min(changed) > 1.0, changed  # every image, not just the flipped ones: rotation, shift, exposure
    assert np.abs(first - plain).max() > 1.0
    again = augmented()
    np.testing.assert_array_equal(again[0][0], first)
    np.testing.assert_array_equal(again[1][0], second)


def test_the_training_dataset_reshuffles_images_with_their_labels(kermany224):
    from chestxray.data.dataset import image_dataset
    from chestxray.data.preprocess import load_image

    paths = [str(p) for p in sorted((kermany224 / "train" / "NORMAL").glob("*.jpeg"))[:8]]
    (x1, y1), (x2, y2) = _epochs(image_dataset(paths, 32, 3, labels=np.eye(8), shuffle_seed=0))
    for images, labels in ((x1, y1), (x2, y2)):
        assert sorted(labels.argmax(1)) == list(range(8))  # each image once an epoch
        for image, label in zip(images, labels):
            np.testing.assert_array_equal(image, load_image(paths[label.argmax()], 32))  # still its own label
    assert list(y1.argmax(1)) != list(y2.argmax(1))  # another order each epoch


def test_a_wrong_mode_is_a_one_line_error(tmp_path, xception_weights):
    """The stage's CLI stops before it reads any data, with the allowed values."""
    from helpers import learnability_params

    params = learnability_params(xception_weights, mode="bogus")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "chestxray.pipeline.train",
                             "--params", str(tmp_path / "params.yaml"),
                             "--config", str(ROOT / "config" / "config.yaml"), "--data", str(tmp_path / "data"),
                             "--out", str(tmp_path / "training")],
                            env={"PYTHONPATH": str(ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": ""},
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: train.mode is 'bogus': use one of auto, cached, end_to_end"


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory, kermany224, xception_weights):
    """The sharp-vs-blurred task trained by the real stage with train.mode end_to_end: (root, test, probs, classes)."""
    root = tmp_path_factory.mktemp("end_to_end")
    return (root, *train_and_score(kermany224, xception_weights, root, **E2E))


@pytest.mark.slow
def test_end_to_end_training_learns_sharp_from_blurred_films(end_to_end):
    root, test, probs, classes = end_to_end
    assert_tells_blurred_from_sharp(test, probs, classes)
    history = json.loads((root / "training" / "history.json").read_text())
    assert [h["phase"] for h in history] == ["head"] * E2E["head_epochs"] + ["fine_tune"] * E2E["fine_tune_epochs"]


@pytest.mark.slow
def test_end_to_end_mode_is_logged_and_skips_the_cache(end_to_end):
    import mlflow

    root = end_to_end[0]
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("learn").experiment_id])
    assert run.data.params["train.mode"] == run.data.params["distribute.mode"] == "end_to_end"
    assert "time.cache_s" not in run.data.metrics and run.data.metrics["time.train_s"] > 0


@pytest.mark.slow
def test_end_to_end_freezes_what_the_cached_path_freezes_and_saves_float32(end_to_end):
    """Below fine_tune_from nothing moved (BatchNorm statistics included); above it and in the head, weights did."""
    import keras

    import chestxray.model.layers  # noqa: F401  (PixelScaling)
    from chestxray.model.build import backbone_of

    root = end_to_end[0]
    info = json.loads((root / "training" / "model_info.json").read_text())
    trained = keras.saving.load_model(root / "training" / "model.keras", compile=False)
    base = keras.saving.load_model(root / "base_model" / "base_model.keras", compile=False)
    assert all(w.dtype == "float32" for w in trained.weights)
    assert {layer.dtype_policy.name for layer in backbone_of(trained).layers[1:]} == {"float32"}
    names = [layer.name for layer in backbone_of(trained).layers]
    cut = names.index(info["fine_tune_from"])
    moved = {name: any(not np.array_equal(a, b) for a, b in zip(backbone_of(trained).get_layer(name).get_weights(),
                                                               backbone_of(base).get_layer(name).get_weights()))
             for name in names}
    assert not any(moved[name] for name in names[:cut]), [name for name in names[:cut] if moved[name]]
    assert any(moved[name] for name in names[cut:])
    assert not any(moved[name] for name in names if "bn" in name)  # BatchNorm stays frozen, as in the cached path
    assert not np.array_equal(trained.get_layer("probabilities").get_weights()[0],
                              base.get_layer("probabilities").get_weights()[0])


@pytest.mark.slow
def test_end_to_end_under_mixed_precision_saves_a_float32_model(end_to_end, xception_weights):
    """mixed_float16 set before the model is built, float16 compute while training, a float32 model saved."""
    import keras
    import pandas as pd

    import chestxray.model.layers  # noqa: F401  (PixelScaling)
    from chestxray.data.preprocess import load_image
    from chestxray.model.build import backbone_of
    from chestxray.pipeline.train import train
    from helpers import learnability_params

    root = end_to_end[0]
    params = {"data": {"normal_class": "NORMAL"},
              **learnability_params(xception_weights, **{**E2E, "head_epochs": 1, "fine_tune_epochs": 1,
                                                          "mixed_precision": "on"})}
    config = {"mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "learn-mixed",
                         "registered_model": "learn"}}
    try:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("MLFLOW_TRACKING_URI", raising=False)
            train(params, config, root / "data", root / "base_model", root / "mixed")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    history = json.loads((root / "mixed" / "history.json").read_text())
    assert [h["phase"] for h in history] == ["head", "fine_tune"] and np.isfinite(history[-1]["loss"])
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("learn-mixed").experiment_id])
    assert run.data.params["distribute.precision_policy"] == "mixed_float16"
    model = keras.saving.load_model(root / "mixed" / "model.keras", compile=False)
    assert {layer.dtype_policy.name for layer in backbone_of(model).layers[1:]} == {"float32"}
    test = pd.read_csv(root / "data" / "manifest.csv").query("split == 'test'")
    images = np.stack([load_image(str(root / "data" / p), 96) for p in test.path[:4]])
    probs = model.predict(images, verbose=0)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=1e-5)
