"""Shared fixtures: paths to the real data in ../shared, a tiny trained model for app tests, the app's test client.

Plain helpers (paths, artifact layouts, keys, upload checks) are in helpers.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers import (API_KEYS, built_once, fit_xray_detector, FULLSIZE, KERMANY224, ROOT, TB256, XCEPTION_WEIGHTS, copy_model, free_port, need,
                     real_test_data, save_artifacts, write_manifest)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# In-process apps skip the load-time test prediction (~2 s of tracing each; the suite creates dozens): the first
# request traces instead. The gunicorn server (bench/inference.Server) and test_reload's warm-up test keep it on.
os.environ.setdefault("CHESTXRAY_WARM_UP", "0")
# Under pytest-xdist each worker is a process of its own: one thread each (TensorFlow, BLAS), and the Makefile
# starts one worker more than there are cores, so the cores stay busy while a worker waits on a server, a
# subprocess or another worker's shared fixture (the fast tests on 2 cores: 2 min 31-43 s, against 2 min 51 s
# with two single-threaded workers and 2 min 54 s to 3 min 13 s with two workers of two threads each).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, "1")


@pytest.fixture(scope="session")
def kermany224() -> Path:
    return need(KERMANY224)


@pytest.fixture(scope="session")
def fullsize_dir() -> Path:
    return need(FULLSIZE)


@pytest.fixture(scope="session")
def tb256() -> Path:
    return need(TB256)


@pytest.fixture(scope="session")
def xception_weights() -> Path:
    return need(XCEPTION_WEIGHTS)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, kermany224) -> Path:
    """A small MobileNetV2 (96 px, no pretrained weights) trained briefly on 64 real images.

    Laid out like the pipeline's artifacts/: training/{model.keras, model_info.json},
    evaluation/{thresholds.json, metrics.json, model_card.md}. Good enough to exercise serving, not to diagnose.
    """
    return built_once(tmp_path_factory, "artifacts", lambda root: _train_tiny(root, kermany224))


def _train_tiny(root: Path, kermany224: Path) -> None:
    import keras
    import numpy as np

    from chestxray.data.preprocess import load_image
    from chestxray.model.build import build_model

    keras.utils.set_random_seed(0)
    classes, size = ["NORMAL", "PNEUMONIA"], 96
    files = [(p, k) for k, c in enumerate(classes) for p in sorted((kermany224 / "train" / c).glob("*.jpeg"))[:32]]
    x = np.stack([load_image(p, size) for p, _ in files])
    y = np.array([k for _, k in files])
    model = build_model("mobilenetv2", size, len(classes), weights="none", dropout=0.1)
    # Eagerly: 8 steps cost less than tracing MobileNetV2's training graph (14 s against 24 s on 2 cores).
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", run_eagerly=True)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)

    save_artifacts(model, root, classes, size, "mobilenetv2")
    (root / "evaluation" / "metrics.json").write_text(json.dumps({"accuracy": 0.5, "roc_auc": 0.5}))
    (root / "evaluation" / "model_card.md").write_text(
        "# Model card: tiny test model\n\n| split | images |\n|---|---|\n| train | 64 |\n\n"
        "Not a diagnosis. <script>alert(1)</script>\n")


@pytest.fixture(scope="session")
def ood_artifacts(tmp_path_factory, kermany224, tb256, xception_weights) -> Path:
    """A small model whose features can tell X-rays from photos, with the reference stage's output.

    ImageNet Xception cut where the pipeline cuts it (after block 10), at 96 px, its head left untrained
    (the "not a chest X-ray" check reads the features only), and artifacts/reference/ fitted by the
    reference stage's own function on 16 train and 8 validation X-rays per class. The tiny_artifacts
    MobileNetV2 trained from scratch is no use here: its pooled features hardly vary between images.
    """
    return built_once(tmp_path_factory, "ood_artifacts",
                      lambda root: _build_ood(root, kermany224, tb256, xception_weights))


def _build_ood(root: Path, kermany224: Path, tb256: Path, xception_weights: Path) -> None:
    import keras

    from chestxray.model.backbones import resolve
    from chestxray.model.build import build_model
    from chestxray.pipeline import reference

    keras.utils.set_random_seed(0)
    classes, size = ["NORMAL", "PNEUMONIA"], 96
    truncate_before, _ = resolve("xception", "auto", "auto")
    model = build_model("xception", size, len(classes), weights=str(xception_weights), dropout=0.1,
                        truncate_before=truncate_before)
    save_artifacts(model, root, classes, size, "xception")
    rows = []
    for label in classes:
        files = sorted((kermany224 / "train" / label).glob("*.jpeg"))
        rows += [{"path": str(p), "label": label, "split": "train"} for p in files[:16]]
        rows += [{"path": str(p), "label": label, "split": "val"} for p in files[16:24]]
    data = write_manifest(root / "data", rows)
    params = {"max_train_images": 1000, "warn_quantile": 0.99, "exposure_tail": 0.005,
              "max_test_images": 0, "seed": 0}
    reference.reference(params, None, data, root / "training", root / "evaluation", root / "reference")
    fit_xray_detector(kermany224, tb256, root / "xray_check")


# --- the app under gunicorn (the production server and config) -------------------------------------

@pytest.fixture(scope="session")
def gunicorn_server(tiny_artifacts, tmp_path_factory):
    """The tiny model served by gunicorn with gunicorn.conf.py (bench/inference.py's Server), keys required.

    The rate limit is on but far above what the tests send; the audit log goes to a file and the
    server's stderr (every other log) to another, so tests can read both.
    """
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from inference import Server

    logs = tmp_path_factory.mktemp("gunicorn")
    env = {"CHESTXRAY_API_KEYS": API_KEYS, "CHESTXRAY_RATE_LIMIT_PER_MIN": "1000000",
           "CHESTXRAY_RATE_LIMIT_BURST": "100000", "CHESTXRAY_AUDIT_LOG": str(logs / "audit.jsonl"),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    server = Server(tiny_artifacts, free_port(), "keras", env=env, log=logs / "server.log")
    server.audit_log, server.server_log = logs / "audit.jsonl", logs / "server.log"
    try:
        server.wait_ready(timeout_s=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_exported(tiny_artifacts, kermany224, tmp_path_factory) -> Path:
    """tiny_artifacts plus export/model.onnx, written by the export stage's own function (read-only for tests)."""
    from chestxray.model.onnx_export import TOLERANCE
    from chestxray.pipeline import export as export_stage

    def build(root: Path) -> None:
        copy_model(tiny_artifacts, root)
        paths = export_stage.split_paths(real_test_data(root, kermany224))
        export_stage.convert_and_check(root / "training", paths, root / "export", TOLERANCE)

    return built_once(tmp_path_factory, "exported", build)


@pytest.fixture(scope="session")
def varying_exported(kermany224, tmp_path_factory) -> Path:
    """A tiny random conv net (96 px) whose output moves with every pixel, laid out like artifacts/ and exported.

    tiny_artifacts' MobileNetV2 answers almost the same for every image, which hides what test-time
    augmentation and corruptions do; this one does not (it is not trained: only for plumbing checks).
    """
    import keras

    from chestxray.model.onnx_export import TOLERANCE
    from chestxray.pipeline import export as export_stage

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((96, 96, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1),
        keras.layers.Conv2D(4, 5, strides=4, activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(2, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 0.05, seed=1)),
    ])

    def build(root: Path) -> None:
        (root / "training").mkdir()
        (root / "evaluation").mkdir()
        model.save(root / "training" / "model.keras")
        (root / "training" / "model_info.json").write_text(json.dumps(
            {"classes": ["NORMAL", "PNEUMONIA"], "normal_class": "NORMAL", "image_size": 96, "backbone": "random-conv"}))
        (root / "evaluation" / "thresholds.json").write_text(json.dumps(
            {"decision_threshold": 0.3, "low_confidence": 0.6, "temperature": 1.5}))
        paths = export_stage.split_paths(real_test_data(root, kermany224))
        export_stage.convert_and_check(root / "training", paths, root / "export", TOLERANCE)

    return built_once(tmp_path_factory, "varying", build)


# --- the app in-process (each module that uses these defines its own `app` fixture) -----------------

@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def xrays(fullsize_dir) -> list[Path]:
    return sorted(fullsize_dir.glob("*/*.jpeg"))
