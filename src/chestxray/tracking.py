"""MLflow, in one place: where the store is, one run per `dvc repro`, logging the model, the champion alias.

The train stage opens the run and writes its id to a small JSON file (a DVC output); evaluate
reopens the same run, so a pipeline run that changes the model is exactly one MLflow run.

A run records the machine and process that hold it (tags chestxray.host, chestxray.pid). A stage
killed outright (SIGKILL, power loss) cannot end its run, which would stay RUNNING for ever; the
next train stage marks such runs KILLED (`close_abandoned_runs`).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient

from chestxray.atomic import pid_alive, write_json

CHAMPION = "champion"
KERAS_SHA256_TAG = "keras_sha256"  # model version tag: the hash of the pipeline's model.keras
HOST_TAG, PID_TAG = "chestxray.host", "chestxray.pid"


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


def _holder_tags() -> dict[str, str]:
    """Which process holds a run: this machine and this process."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs of this experiment left RUNNING by a process of this machine that no longer exists."""
    client = MlflowClient()
    running = client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                                                f"tags.`{HOST_TAG}` = '{socket.gethostname()}'")
    closed = []
    for run in running:
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and not pid_alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def start_run(config: dict, run_file: Path, run_name: str | None = None) -> mlflow.ActiveRun:
    """Open a new run and record its id in `run_file` for the later stages; first close abandoned runs."""
    setup(config)
    experiment = mlflow.get_experiment_by_name(config["mlflow"]["experiment"])
    for run_id in close_abandoned_runs(experiment.experiment_id):
        print(f"MLflow run {run_id} was left running by a process that no longer exists: marked KILLED", flush=True)
    run = mlflow.start_run(run_name=run_name, tags=_holder_tags())
    write_json(run_file, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
    return run


def resume_run(config: dict, run_file: Path) -> mlflow.ActiveRun:
    """Reopen the run that the train stage started (or a new one if its record is missing)."""
    setup(config)
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    return mlflow.start_run(run_id=run_id, tags=_holder_tags())  # this process holds it now


def log_model(model, example, probabilities, extra_files: list[Path], registered_name: str,
              keras_sha256: str) -> str:
    """Log the Keras model with signature, input example and its JSON side files; register it; return the version.

    `keras_sha256` (the pipeline's model.keras) is tagged on the version: the ONNX export and the
    reference in the same run name the model by it.
    """
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
    version = str(info.registered_model_version)
    MlflowClient().set_model_version_tag(registered_name, version, KERAS_SHA256_TAG, keras_sha256)
    return version


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
