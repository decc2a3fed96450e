"""Plain helpers shared by the test modules: paths to the shared data, artifact layouts, API keys,
upload and response checks for the app, and ingest sources. Fixtures live in conftest.py.

Test modules import from here (`from helpers import ...`), never from conftest.py or another test_* module.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHESTXRAY_SHARED", ROOT.parent / "shared"))
KERMANY224 = SHARED / "data" / "kermany224"
FULLSIZE = SHARED / "data" / "kermany-val-fullsize"
TB256 = SHARED / "data" / "tb256"
XCEPTION_WEIGHTS = SHARED / "weights" / "xception_imagenet_notop.weights.h5"

CLASSES = ["NORMAL", "PNEUMONIA"]


def missing(message: str) -> None:
    """Something a test needs is absent: a skip locally, a failure under CI (CI=true), so that a CI
    machine without the data or the browser cannot go green having tested little."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def need(path: Path) -> Path:
    """The real data or weights at `path` (see `missing`)."""
    if not path.exists():
        missing(f"real data not found at {path}: put the shared data beside the repo (../shared, see "
                f"../shared/data/README.md) or point CHESTXRAY_SHARED at it")
    return path


# --- artifacts and data folders -------------------------------------------------------------------

def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `build` once per test run and shared by pytest-xdist's workers.

    Each xdist worker has its own session: without this, every worker would train the same model
    again. The first worker to ask builds it under a file lock; the others wait, then reuse it.
    Tests treat such a folder as read-only (copy_model first to change anything).
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # one folder above the workers' own: the run's, shared by all of them
    root, done = base / name, base / f"{name}.complete"
    with FileLock(str(base / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            build(root)
            done.touch()
    return root


def save_artifacts(model, root: Path, classes: list[str], size: int, backbone: str) -> Path:
    """training/{model.keras, model_info.json} and evaluation/thresholds.json, laid out as the pipeline does."""
    (root / "training").mkdir()
    (root / "evaluation").mkdir()
    model.save(root / "training" / "model.keras")
    (root / "training" / "model_info.json").write_text(json.dumps({
        "classes": classes, "normal_class": "NORMAL", "image_size": size, "backbone": backbone,
        "trained_at": "2026-01-01T00:00:00+00:00",
    }))
    (root / "evaluation" / "thresholds.json").write_text(json.dumps({"decision_threshold": 0.5, "low_confidence": 0.6}))
    return root


def write_manifest(data_dir: Path, rows: list[dict]) -> Path:
    """A data folder's manifest.csv (path, label, split) listing real images by absolute path."""

    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return data_dir


def copy_model(src: Path, dest: Path, parts: tuple[str, ...] = ("training", "evaluation")) -> Path:
    """Parts of an artifacts folder, copied (the session's tiny artifacts stay untouched)."""
    for part in parts:
        shutil.copytree(src / part, dest / part)
    return dest


def set_reference_thresholds(root: Path, thresholds: list[float], legacy: bool = False) -> None:
    """Move the population check's threshold(s) in root/reference/reference.npz (a copy: see copy_model).

    `legacy` writes the layout of references made before the refuse threshold was dropped: thresholds
    [warn, refuse], no stored distance bins and no exposure ranges in ood.json.
    """
    from chestxray.evaluation.drift import OOD_EDGES
    from chestxray.model.ood import OOD_FILE, REFERENCE_FILE
    from chestxray.model.population import EXPOSURE

    path = root / "reference" / REFERENCE_FILE
    with np.load(path) as stored:
        arrays = {k: stored[k] for k in stored.files}
    arrays["thresholds"] = np.array(thresholds, np.float64)
    if legacy:
        arrays.pop(OOD_EDGES, None)
        summary = json.loads((root / "reference" / OOD_FILE).read_text())
        summary.pop(EXPOSURE, None)
        (root / "reference" / OOD_FILE).write_text(json.dumps(summary))
    np.savez(path, **arrays)


def photo_png() -> bytes:
    """scikit-learn's sample photo of a Chinese temple, as a PNG upload: as far from a chest X-ray as it gets."""
    from sklearn.datasets import load_sample_image

    return png_bytes(load_sample_image("china.jpg")[..., ::-1])  # RGB -> BGR for OpenCV


def darkened_png(data: bytes, factor: float = 0.4) -> bytes:
    """An X-ray's gray levels scaled by `factor` (an under-exposed film), as a PNG."""
    import cv2

    gray = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    return png_bytes((gray * factor).astype(np.uint8))


def real_test_data(root: Path, kermany224: Path, per_class: int = 6) -> Path:
    """A data folder whose manifest lists real test images (absolute paths) as the test split."""
    return write_manifest(root / "data", [{"path": str(p), "label": c, "split": "test"} for c in ("NORMAL", "PNEUMONIA")
                                          for p in sorted((kermany224 / "test" / c).glob("*.jpeg"))[:per_class]])


# --- the app: keys, servers, uploads and what its answers must look like ----------------------------

USER_KEY = "user-key-0123456789abcdef"
ADMIN_KEY = "admin-key-0123456789abcdef"
API_KEYS = f"clinic:{USER_KEY}:user,ops:{ADMIN_KEY}:admin"

PREDICTION_KEYS = {"predicted_class", "confidence", "probabilities", "low_confidence", "warnings", "warning_messages",
                   "ood_distance", "xray_score", "model_version", "inference_time_ms"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(app) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG of `image`: 8- or 16-bit (by dtype), gray or BGR(A) as OpenCV takes it."""
    import cv2

    return cv2.imencode(".png", image)[1].tobytes()


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12, **tags) -> bytes:
    """A single-frame uncompressed DICOM file (CR, Secondary Capture) holding `pixels` as they are.

    8 bits stored: one byte a pixel; more: two. MONOCHROME1 means white is low signal, so a caller
    storing an X-ray as MONOCHROME1 passes the inverted pixels. The values must fit in `bits_stored`.
    `tags` are set as they are (e.g. RescaleIntercept=-1000, WindowCenter=..., WindowWidth=...).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    assert pixels.ndim == 2 and 0 <= int(pixels.min()) and int(pixels.max()) < 2 ** bits_stored
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    allocated = 8 if bits_stored <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = allocated, bits_stored, bits_stored - 1, 0
    ds.PixelData = pixels.astype(np.uint8 if allocated == 8 else np.uint16).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def upload(data: bytes, name: str = "scan.jpeg", field: str = "file") -> dict:
    return {field: (io.BytesIO(data), name)}


def assert_error(response, status: int, code: str | None = None) -> dict:
    """A JSON error with a code and a message in words, never HTML."""
    assert response.status_code == status, response.data[:300]
    assert response.is_json, response.data[:300]
    body = response.get_json()
    assert set(body) >= {"error", "message"}
    assert len(body["message"].split()) >= 2, body
    if code:
        assert body["error"] == code, body
    return body


def assert_prediction(body: dict) -> None:
    assert PREDICTION_KEYS <= set(body)
    assert body["predicted_class"] in CLASSES
    assert list(body["probabilities"]) == CLASSES
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert body["confidence"] == pytest.approx(body["probabilities"][body["predicted_class"]])
    assert body["low_confidence"] == ("low_confidence" in body["warnings"])
    # Every warning comes with words a clinician can read, and no words without a warning.
    assert list(body["warning_messages"]) == body["warnings"]
    assert all(isinstance(w, str) and len(w) > 40 for w in body["warning_messages"].values())


# --- ingest sources ---------------------------------------------------------------------------------

def data_params(source: str | Path, **overrides) -> dict:
    params = {"source": str(source), "checksum": None, "val_fraction": 0.1, "test_fraction": 0.15,
              "min_size": 128, "patient_overlap": "drop", "seed": 42}
    return {**params, **overrides}


def make_subset(kermany: Path, dest: Path, train_per_class: int = 10, test_per_class: int = 4) -> Path:
    """Copy the first real images of each class into dest/{train,test}/<class>/."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for label in CLASSES:
            (dest / split / label).mkdir(parents=True)
            for f in sorted((kermany / split / label).glob("*.jpeg"))[:n]:
                shutil.copy(f, dest / split / label / f.name)
    return dest


def make_zip(folder: Path, dest: Path, prefix: str = "chest_xray/chest_xray") -> Path:
    """A zip laid out like Kaggle's: wrapper folders and a __MACOSX tree."""
    with zipfile.ZipFile(dest, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                name = f"{prefix}/{f.relative_to(folder).as_posix()}"
                zf.write(f, name)
                zf.writestr(f"__MACOSX/{Path(name).parent.as_posix()}/._{f.name}", b"\x00\x05\x16\x07")
    return dest



def fit_xray_detector(kermany224: Path, tb256: Path, out: Path) -> None:
    """The "not a chest X-ray" detector, trained by its own code on 300 child and 300 adult films (not those the
    tests upload: Kermany test images and the full-size originals) against the package images' copies."""
    from chestxray.data.preprocess import decode_image
    from chestxray.model.xray_detector import XrayDetector, detector_input
    from chestxray.pipeline.xray_check import non_xrays

    files = [p for label in ("NORMAL", "PNEUMONIA") for p in sorted((kermany224 / "train" / label).glob("*.jpeg"))[
        100:250]] + [p for label in ("NORMAL", "TUBERCULOSIS") for p in sorted((tb256 / label).iterdir())[:150]]
    xrays = np.stack([detector_input(decode_image(p.read_bytes())) for p in files])
    others, _, _ = non_xrays(count=4, seed=0)
    XrayDetector.fit(xrays, others, epochs=12, seed=0).save(out)



# --- a task any working training loop learns: sharp against blurred real films --------------------
# test_learnability.py says why; test_end_to_end_training.py trains it end to end.

LEARN_PER_CLASS = 60  # 30 NORMAL + 30 PNEUMONIA films per class, different films in each class
BLUR_RADIUS = 6
MIN_AUC = 0.9  # measured 1.000, 1.000, 0.988, 1.000 (not bit-reproducible on CPU); 0.59 with shuffled labels


def _films(kermany224: Path, start: int, n: int) -> list:
    """n real films, half NORMAL and half PNEUMONIA (so the task is blur, not disease), from `start` in name order."""
    half = n // 2
    return [f for label in ("NORMAL", "PNEUMONIA")
            for f in sorted((kermany224 / "train" / label).glob("*.jpeg"))[start:start + half]]


def make_sharp_vs_blurred(kermany224: Path, dest: Path, per_class: int = LEARN_PER_CLASS,
                          shuffle_labels: bool = False) -> Path:
    """dest/{SHARP,BLURRED}/<name>.jpeg, each file its own patient (the carved test split is then per image).

    shuffle_labels puts a seeded random half of each class's images in the other class folder:
    the labels no longer say anything about the images (the test must then fail).
    """
    from PIL import Image, ImageFilter

    sharp, blurred = _films(kermany224, 0, per_class), _films(kermany224, per_class, per_class)
    blur = ImageFilter.GaussianBlur(BLUR_RADIUS)
    images = [Image.open(f).convert("L") for f in sharp] + [Image.open(f).convert("L").filter(blur) for f in blurred]
    labels = ["SHARP"] * len(sharp) + ["BLURRED"] * len(blurred)
    if shuffle_labels:
        labels = list(np.random.default_rng(0).permutation(labels))
    for index, (image, label) in enumerate(zip(images, labels)):
        (dest / label).mkdir(parents=True, exist_ok=True)
        image.save(dest / label / f"film{index:03d}.jpeg", quality=95)
    return dest


def learnability_params(weights: Path, image_size: int = 96, **train) -> dict:
    """base_model and train params of the sharp-vs-blurred task; `train` overrides train's."""
    return {
        "base_model": {"backbone": "xception", "weights": str(weights), "image_size": image_size,
                       "truncate_before": "auto", "dropout": 0.3, "dense_units": 0},
        "train": {"seed": 42, "batch_size": 16, "loss": "weighted_ce", "head_epochs": 10, "head_lr": 1e-3,
                  "fine_tune_from": "auto", "fine_tune_epochs": 0, "fine_tune_lr": 1e-4, "patience": 10,
                  "augment_views": 0, "augment": {}, **train},
    }


def train_and_score(kermany224: Path, weights: Path, root: Path, per_class: int = LEARN_PER_CLASS,
                    shuffle_labels: bool = False, image_size: int = 96, **train) -> tuple:
    """Ingest the folder, build and train with the stage functions, score the test rows with the Predictor.

    (test rows of the manifest, their served probabilities, the classes). MLflow logs to root/mlflow.db.
    """
    import mlflow
    import pandas as pd

    from chestxray.model.artifacts import ModelFiles
    from chestxray.model.predictor import Predictor
    from chestxray.pipeline.ingest import ingest
    from chestxray.pipeline.prepare_base_model import prepare
    from chestxray.pipeline.train import train as train_stage

    source = make_sharp_vs_blurred(kermany224, root / "source", per_class, shuffle_labels)
    data = root / "data"
    params = {"data": data_params(source, val_fraction=0.2, test_fraction=0.3),
              **learnability_params(weights, image_size, **train)}
    ingest(params["data"], data)
    prepare(params["base_model"], data, root / "base_model")
    config = {"mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "learn",
                         "registered_model": "learn"}}
    mlflow.end_run()
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        train_stage(params, config, data, root / "base_model", root / "training")

    test = pd.read_csv(data / "manifest.csv").query("split == 'test'")
    predictor = Predictor.load(ModelFiles(root / "training"), backend="keras")
    probs = predictor.served_probabilities_for_files([str(data / p) for p in test.path])
    return test, probs, predictor.classes


def assert_tells_blurred_from_sharp(test, probs: np.ndarray, classes: list[str]) -> float:
    """Held-out films told apart (ROC AUC >= MIN_AUC), the BLURRED column high on blurred films; the AUC."""
    from sklearn.metrics import roc_auc_score

    is_blurred = (test.label == "BLURRED").to_numpy()
    p_blurred = probs[:, classes.index("BLURRED")]
    auc = roc_auc_score(is_blurred, p_blurred)
    print(f"test ROC AUC {auc:.3f}; mean P(BLURRED) {p_blurred[is_blurred].mean():.3f} on blurred, "
          f"{p_blurred[~is_blurred].mean():.3f} on sharp")
    assert auc >= MIN_AUC, f"test ROC AUC {auc:.3f} < {MIN_AUC}: the train stage did not learn an easy task"
    # Not swapped: the column named BLURRED is the one that is high on blurred films.
    assert p_blurred[is_blurred].mean() > p_blurred[~is_blurred].mean()
    assert (probs.argmax(1) == np.where(is_blurred, classes.index("BLURRED"), classes.index("SHARP"))).mean() >= 0.8
    return auc
