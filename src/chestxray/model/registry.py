"""Serving a registered model: download the version with an alias, laid out like artifacts/, and load it.

    predictor = load_registered("chestxray", "champion", backend="auto")   # MLFLOW_TRACKING_URI picks the store

With it come its run's ONNX export, population reference and "not a chest X-ray" detector, so it
serves like Predictor.from_artifacts; a version registered before its model hash was tagged has
no export or reference (Keras only, population check off).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from chestxray.model.artifacts import (EVALUATION_DIR, EXPORT_DIR, INFO_FILE, MODEL_CARD_FILE, MODEL_FILE, ONNX_FILE,
                                       REFERENCE_DIR, XRAY_CHECK_DIR, ModelFiles)
from chestxray.model.ood import OOD_FILE, REFERENCE_FILE
from chestxray.model.predictor import Predictor
from chestxray.model.xray_detector import DETECTOR_FILE

REGISTERED_MODEL_DIR = "model"  # where the registered model.keras and model_info.json go in the download


def download_registered_model(name: str, alias: str, folder: Path) -> tuple[ModelFiles, str, str | None]:
    """Fetch the model version with `alias` into `folder`: (its files, 'name/version', keras sha256 or None).

    The registered files and the run's model card, and, when the version's run logged them,
    export/model.onnx and reference/. Those two are tied to the pipeline's model.keras by its
    sha256, which is tagged on the version at registration (MLflow re-saves the model it
    registers, so the registered file's own hash differs); a version without that tag comes without them.
    """
    import mlflow
    from mlflow import MlflowClient

    from chestxray.tracking import KERAS_SHA256_TAG, tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    version = MlflowClient().get_model_version_by_alias(name, alias)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}", dst_path=str(folder)))
    model_dir, eval_dir = local / REGISTERED_MODEL_DIR, local / EVALUATION_DIR
    model_dir.mkdir(exist_ok=True)
    eval_dir.mkdir(exist_ok=True)
    (local / "data" / MODEL_FILE).rename(model_dir / MODEL_FILE)
    for extra in (local / "extra_files").glob("*.json"):
        extra.rename((model_dir if extra.name == INFO_FILE else eval_dir) / extra.name)
    # Run artifacts go to their run paths (evaluation/, export/, reference/): the artifacts/ layout.
    _download_run_file(version.run_id, f"{EVALUATION_DIR}/{MODEL_CARD_FILE}", local)
    keras_sha256 = version.tags.get(KERAS_SHA256_TAG)
    if keras_sha256:
        for path in (f"{EXPORT_DIR}/{ONNX_FILE}", f"{REFERENCE_DIR}/{OOD_FILE}", f"{REFERENCE_DIR}/{REFERENCE_FILE}"):
            _download_run_file(version.run_id, path, local)
    _download_run_file(version.run_id, f"{XRAY_CHECK_DIR}/{DETECTOR_FILE}", local)  # not tied to model.keras
    onnx_path = local / EXPORT_DIR / ONNX_FILE
    files = ModelFiles(model_dir, eval_dir, onnx_path if onnx_path.is_file() else None, local / REFERENCE_DIR,
                       local / XRAY_CHECK_DIR)
    return files, f"{name}/{version.version}", keras_sha256


def _download_run_file(run_id: str, artifact_path: str, root: Path) -> None:
    """Put the run's `artifact_path` at root/artifact_path if the run logged it (stages that ran later may not have)."""
    import mlflow

    folder = (root / artifact_path).parent  # a file's download lands in dst_path under its bare name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(folder))
    except Exception:  # not logged (a run from before that stage existed): the model still loads
        return


def load_registered(name: str, alias: str = "champion", backend: str | None = "auto",
                    tta: bool = False) -> Predictor:
    """The predictor of the registered version that carries `alias`; the download is removed once loaded."""
    # Read into memory and removed: reloads do not pile model copies up on disk.
    with tempfile.TemporaryDirectory(prefix="chestxray-registry-") as folder:
        files, version, keras_sha256 = download_registered_model(name, alias, Path(folder))
        untagged = (f"{version} was registered without the hash of its model.keras, so its run's reference "
                    "cannot be matched to it -- register it again (`dvc repro -f -s register`) and move the "
                    "alias to the new version (`chestxray promote VERSION`)")
        return Predictor.load(files, backend, tta, version=version, keras_sha256=keras_sha256,
                              no_reference_reason=None if keras_sha256 else untagged)
