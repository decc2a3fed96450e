"""The train stage on several devices and several machines (tf.distribute), on CPU, against a one-process run.

The real train stage (`python -m chestxray.pipeline.train`) trains the same tiny task three ways on
real Kermany films: one process on one CPU (the reference), one process with two logical CPU devices
(MirroredStrategy), and two worker processes on 127.0.0.1 driven by TF_CONFIG
(MultiWorkerMirroredStrategy). `train.batch_size` is per replica and the learning rates scale with
the replicas, so 2 replicas x batch 16 at lr must train exactly like 1 replica x batch 32 at 2 x lr:
the same weights in model.keras, the same predictions, the same history, within TOLERANCE.

Set-up chosen so that equality is expected, not just similarity:
- the whole train split (32 films) is one global batch, so the order tf.data shuffles it in does not
  matter (Keras draws one batch under a strategy before fitting, which moves tf.data's reshuffle
  on by one epoch: with several batches an epoch the split runs would see other batch compositions);
- dropout 0: each replica draws its own dropout mask, so with dropout the runs are alike in
  distribution only.

TOLERANCE: the replicas' gradients are summed by an all-reduce instead of inside one batch, so float32
sums are rounded in another order (~1e-7 relative a step) and Adam, which divides by the gradients'
running RMS, passes such differences on; over the ~10 steps here they stay far below 1e-4 (measured
in the report of the branch that added this file), while an unscaled learning rate or a wrong global
batch moves weights by more than 1e-3.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import ROOT, free_port, write_manifest

TOLERANCE = 1e-4  # max |difference| of weights and of predicted probabilities; see the module docstring
PER_CLASS_TRAIN, PER_CLASS_VAL = 16, 8
REPLICAS = 2
PER_REPLICA_BATCH = PER_CLASS_TRAIN * 2 // REPLICAS  # the whole train split is one global batch
HEAD_LR, FINE_TUNE_LR = 1e-3, 1e-4
RUN_TIMEOUT_S = 300

TWO_LOGICAL_CPUS = ("import sys, tensorflow as tf; "
                    "tf.config.set_logical_device_configuration(tf.config.list_physical_devices('CPU')[0], "
                    "[tf.config.LogicalDeviceConfiguration()] * 2); "
                    "from chestxray.pipeline.train import main; main(sys.argv[1:])")


def stage_params(weights: Path, per_replica_batch: int, lr_factor: float, **train) -> dict:
    return {
        "data": {"normal_class": "NORMAL", "seed": 0},
        "base_model": {"backbone": "xception", "weights": str(weights), "image_size": 96, "truncate_before": "auto",
                       "dropout": 0.0, "dense_units": 0},
        "train": {"seed": 42, "accelerator": "auto", "mixed_precision": "auto", "batch_size": per_replica_batch,
                  "loss": "weighted_ce", "head_epochs": 6, "head_lr": HEAD_LR * lr_factor, "fine_tune_from": "auto",
                  "fine_tune_epochs": 2, "fine_tune_lr": FINE_TUNE_LR * lr_factor, "patience": 10,
                  "augment_views": 0, "augment": {}, **train},
    }


@pytest.fixture(scope="module")
def task(tmp_path_factory, kermany224, xception_weights) -> Path:
    """data/ (manifest of real films, report.json) and base_model/ made by the prepare_base_model stage."""
    from chestxray.pipeline.prepare_base_model import prepare

    root = tmp_path_factory.mktemp("distributed")
    rows = []
    for label in ("NORMAL", "PNEUMONIA"):
        files = sorted((kermany224 / "train" / label).glob("*.jpeg"))
        rows += [{"path": str(p), "label": label, "split": "train"} for p in files[:PER_CLASS_TRAIN]]
        rows += [{"path": str(p), "label": label, "split": "val"}
                 for p in files[PER_CLASS_TRAIN:PER_CLASS_TRAIN + PER_CLASS_VAL]]
    data = write_manifest(root / "data", rows)
    (data / "report.json").write_text(json.dumps({"classes": ["NORMAL", "PNEUMONIA"], "dataset_sha256": "test"}))
    params = stage_params(xception_weights, PER_REPLICA_BATCH, 1.0)
    prepare(params["base_model"], data, root / "base_model")
    return root


def start_train(task: Path, run: Path, params: dict, code: str | None = None,
                tf_config: dict | None = None, tracking: Path | None = None) -> subprocess.Popen:
    """The train stage's CLI in a process of its own (`code`: python -c code instead of -m, same arguments)."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    store = tracking or run / "mlflow.db"
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"mlflow": {"tracking_uri": f"sqlite:///{store}", "experiment": "distributed", "registered_model": "d"}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    args = ["--params", str(run / "params.yaml"), "--config", str(run / "config.yaml"), "--data", str(task / "data"),
            "--base-model", str(task / "base_model"), "--out", str(run / "out" / "training")]
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "chestxray.pipeline.train"]
    log = open(run / "log.txt", "w")
    return subprocess.Popen(command + args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=run)


def finish(process: subprocess.Popen, run: Path) -> Path:
    """Wait for a run; fail with its log if it failed; its training output folder."""
    try:
        code = process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        code = "timeout"
    assert code == 0, f"train run {run.name} failed ({code}):\n{(run / 'log.txt').read_text()[-4000:]}"
    return run / "out" / "training"


@pytest.fixture(scope="module")
def reference(task, xception_weights) -> Path:
    """One process, one CPU: batch 32 at twice the learning rates, what 2 replicas x 16 must equal."""
    run = task / "single"
    params = stage_params(xception_weights, PER_REPLICA_BATCH * REPLICAS, REPLICAS)
    return finish(start_train(task, run, params), run)


def val_images(task: Path) -> np.ndarray:
    import pandas as pd

    from chestxray.data.preprocess import load_image

    manifest = pd.read_csv(task / "data" / "manifest.csv").query("split == 'val'")
    return np.stack([load_image(p, 96) for p in manifest.path])


def compare_models(task: Path, got: Path, want: Path) -> tuple[float, float]:
    """(max |weight difference|, max |probability difference| on the val films) of two model.keras."""
    import keras

    import chestxray.model.layers  # noqa: F401  (PixelScaling)

    a, b = (keras.saving.load_model(p / "model.keras", compile=False) for p in (got, want))
    weights = max(float(np.abs(x - y).max()) for x, y in zip(a.get_weights(), b.get_weights()))
    images = val_images(task)
    pa, pb = a.predict(images, verbose=0), b.predict(images, verbose=0)
    assert pa.dtype == np.float32  # served in float32 on a CPU
    return weights, float(np.abs(pa - pb).max())


def assert_same_training(task: Path, got: Path, want: Path) -> None:
    history, expected = (json.loads((p / "history.json").read_text()) for p in (got, want))
    assert [(h["phase"], h["epoch"]) for h in history] == [(h["phase"], h["epoch"]) for h in expected]
    for h, e in zip(history, expected):
        for key in ("loss", "val_loss", "val_auc", "val_accuracy"):
            assert abs(h[key] - e[key]) <= 1e-3, f"{key} at {h['phase']} epoch {h['epoch']}: {h[key]} vs {e[key]}"
    assert history[-1]["learning_rate"] == pytest.approx(expected[-1]["learning_rate"])  # scaled x replicas
    weights, probabilities = compare_models(task, got, want)
    print(f"max |weight difference| {weights:.2e}, max |probability difference| {probabilities:.2e}")
    assert weights <= TOLERANCE and probabilities <= TOLERANCE
    # The comparison means something: training moved the weights 10 x TOLERANCE or more (one Adam step
    # at the scaled head lr moves a weight by about 2e-3; the best epoch kept may be an early one).
    import keras

    base = keras.saving.load_model(task / "base_model" / "base_model.keras", compile=False)
    trained = keras.saving.load_model(got / "model.keras", compile=False)
    moved = max(float(np.abs(x - y).max()) for x, y in zip(base.get_weights(), trained.get_weights()))
    assert moved >= 10 * TOLERANCE, f"training moved the weights by {moved:.1e} only"


def logged_params(store: Path) -> list[dict]:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("distributed")
    return [run.data.params for run in client.search_runs([experiment.experiment_id])]


@pytest.mark.slow
def test_two_logical_cpus_under_mirrored_strategy_train_like_one_process(task, reference, xception_weights):
    run = task / "mirrored"
    params = stage_params(xception_weights, PER_REPLICA_BATCH, 1.0)
    out = finish(start_train(task, run, params, code=TWO_LOGICAL_CPUS), run)

    assert "training with MirroredStrategy strategy on 2 cpu replica(s)" in (run / "log.txt").read_text()
    [logged] = logged_params(run / "mlflow.db")
    assert logged["distribute.strategy"] == "MirroredStrategy"
    assert (logged["distribute.replicas"], logged["distribute.global_batch"]) == ("2", str(PER_REPLICA_BATCH * 2))
    assert float(logged["distribute.scaled_head_lr"]) == pytest.approx(HEAD_LR * REPLICAS)
    assert logged["distribute.precision_policy"] == "float32"
    assert_same_training(task, out, reference)


@pytest.mark.slow
def test_two_workers_under_multi_worker_mirrored_strategy_train_like_one_process(task, reference, xception_weights):
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    store = task / "multi_worker_mlflow.db"  # one store for both, as a shared tracking server would be
    params = stage_params(xception_weights, PER_REPLICA_BATCH, 1.0)
    runs = [task / f"worker{i}" for i in range(2)]
    processes = [start_train(task, run, params, tf_config={"cluster": cluster, "task": {"type": "worker", "index": i}},
                             tracking=store) for i, run in enumerate(runs)]
    outs = [finish(process, run) for process, run in zip(processes, runs)]

    assert "training with MultiWorkerMirroredStrategy strategy on 2 cpu replica(s)" in (runs[0] / "log.txt").read_text()
    # Only the chief (worker 0) logs to MLflow and writes the model; worker 1 leaves nothing behind.
    [logged] = logged_params(store)
    assert (logged["distribute.strategy"], logged["distribute.workers"]) == ("MultiWorkerMirroredStrategy", "2")
    assert (logged["distribute.replicas"], logged["distribute.global_batch"]) == ("2", str(PER_REPLICA_BATCH * 2))
    assert float(logged["distribute.scaled_fine_tune_lr"]) == pytest.approx(FINE_TUNE_LR * REPLICAS)
    assert (outs[0] / "model.keras").is_file() and (outs[0] / "model_info.json").is_file()
    assert not outs[1].exists() or not any(outs[1].iterdir())
    assert_same_training(task, outs[0], reference)


def test_gpu_asked_for_without_one_is_a_one_line_error(tmp_path, xception_weights):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    params = stage_params(xception_weights, 16, 1.0, accelerator="gpu")
    process = start_train(tmp_path, tmp_path / "gpu", params)
    assert process.wait(timeout=RUN_TIMEOUT_S) == 1
    log = (tmp_path / "gpu" / "log.txt").read_text()
    assert "Traceback" not in log
    assert log.strip().splitlines()[-1].startswith("error: train.accelerator is 'gpu' but TensorFlow finds no GPU")
    assert "make setup GPU=1" in log


def test_mixed_precision_is_applied_to_a_loaded_model_and_undone_for_serving():
    """Keras 3 keeps each layer's saved dtype policy: loading under the global policy is not enough."""
    import keras

    from chestxray.model.build import build_model
    from chestxray.model.distribute import MIXED, with_precision

    keras.utils.set_random_seed(0)
    model = build_model("mobilenetv2", 96, 2, weights="none", dropout=0.0)
    images = np.random.default_rng(0).uniform(0, 255, (4, 96, 96, 3)).astype(np.float32)
    try:
        keras.mixed_precision.set_global_policy(MIXED)
        assert model.get_layer("backbone").get_layer("Conv1").compute_dtype == "float32"  # the bug
        mixed = with_precision(model, MIXED)
        assert mixed.get_layer("backbone").get_layer("Conv1").compute_dtype == "float16"
        assert mixed.get_layer("probabilities").compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    served = with_precision(mixed, "float32")
    assert all(layer.compute_dtype == "float32" for layer in served.get_layer("backbone").layers[1:])
    out = served.predict(images, verbose=0)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, model.predict(images, verbose=0))  # the same weights
    assert np.abs(mixed.predict(images, verbose=0) - out).max() < 0.05  # float16 compute: close, not equal
    assert with_precision(model, "float32") is model  # the CPU path is left untouched
