"""MLflow, in one place: where the store is, one run per `dvc repro`, logging the model, the champion alias.

The train stage opens the run and writes its id to a small JSON file (a DVC output); evaluate
reopens the same run, so a pipeline run that changes the model is exactly one MLflow run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

CHAMPION = "champion"


def tracking_uri(config: dict | None = None) -> str:
    """The store: MLFLOW_TRACKING_URI if set, else config/config.yaml's mlflow.tracking_uri."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if config is None:
        from chestxray.settings import load_config

        config = load_config()
    return config["mlflow"]["tracking_uri"]


def setup(config: dict) -> str:
    """Point MLflow at the store and select the experiment."""
    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(config["mlflow"]["experiment"])
    return uri


def flatten(params: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}, the shape MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def start_run(config: dict, run_file: Path, run_name: str | None = None) -> mlflow.ActiveRun:
    """Open a new run and record its id in `run_file` for the later stages."""
    setup(config)
    run = mlflow.start_run(run_name=run_name)
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}, indent=2))
    return run


def resume_run(config: dict, run_file: Path) -> mlflow.ActiveRun:
    """Reopen the run that the train stage started (or a new one if its record is missing)."""
    setup(config)
    if run_file.is_file():
        return mlflow.start_run(run_id=json.loads(run_file.read_text())["run_id"])
    return mlflow.start_run()


def log_model(model, example, probabilities, extra_files: list[Path], registered_name: str) -> str:
    """Log the Keras model with signature, input example and its JSON side files; register it; return the version."""
    import keras
    import mlflow.tensorflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    info = mlflow.tensorflow.log_model(
        model,
        name="model",
        signature=infer_signature(example, probabilities),
        input_example=example,
        extra_files=[str(p) for p in extra_files],
        registered_model_name=registered_name,
        # Naming them skips MLflow's slow requirement inference.
        pip_requirements=[f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}"],
    )
    return str(info.registered_model_version)


def promote_if_better(name: str, version: str, metric: str, value: float) -> bool:
    """Give `version` the champion alias if its validation `metric` beats the current champion's."""
    client = MlflowClient()
    client.set_model_version_tag(name, version, metric, str(value))
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
        best = float(current.tags.get(metric, "-inf"))
    except mlflow.exceptions.MlflowException:  # no champion yet
        best = float("-inf")
    if value > best:
        client.set_registered_model_alias(name, CHAMPION, version)
        return True
    return False


def download_registered_model(name: str, alias: str = CHAMPION) -> tuple[Path, str]:
    """Fetch the model version with `alias`; returns (dir with model/ and evaluation/, 'name/version')."""
    import tempfile

    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    version = client.get_model_version_by_alias(name, alias)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}", dst_path=tempfile.mkdtemp()))
    # Lay the files out like the pipeline's artifacts so Classifier.from_dirs reads both alike.
    model_dir, eval_dir = local / "model", local / "evaluation"
    model_dir.mkdir(exist_ok=True)
    eval_dir.mkdir(exist_ok=True)
    (local / "data" / "model.keras").rename(model_dir / "model.keras")
    for extra in (local / "extra_files").glob("*.json"):
        target = model_dir if extra.name == "model_info.json" else eval_dir
        extra.rename(target / extra.name)
    _download_model_card(version.run_id, eval_dir)
    return local, f"{name}/{version.version}"


def _download_model_card(run_id: str, eval_dir: Path) -> None:
    """The model card, which the model_card stage logs to the run after registration; absent cards are fine."""
    from chestxray.model.classifier import MODEL_CARD_FILE

    try:
        card = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"evaluation/{MODEL_CARD_FILE}",
                                                   dst_path=str(eval_dir / "run"))
    except Exception:  # no card logged (a run from before the stage existed): the model still loads
        return
    Path(card).rename(eval_dir / MODEL_CARD_FILE)
