"""MLflow, in one place: where the store is, one run per `dvc repro`, logging the model, the champion alias.

The train stage opens the run and writes its id to a small JSON file (a DVC output); the later
stages reopen the same run, so a pipeline run that changes the model is exactly one MLflow run.
The register stage registers the model and moves the champion alias by the rule in
`promotion_decision`; `chestxray promote VERSION` moves it by hand (`set_champion`).

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
    """Point MLflow at the store and select the experiment (created with its artifact folder if new)."""
    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    name = config["mlflow"]["experiment"]
    if mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=_artifact_root(uri))
        except mlflow.exceptions.MlflowException:  # another process created it in between
            pass
    mlflow.set_experiment(name)
    return uri


def _artifact_root(uri: str) -> str | None:
    """For a SQLite store, mlruns/ beside its database file; else the server's or MLflow's default.

    MLflow's own default for a database store is ./mlruns of whatever folder the process runs in,
    so a store used from two folders (a test's temporary store, a script run elsewhere) scattered its files.
    """
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


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

    keras.utils.disable_interactive_logging()  # MLflow runs the input example through the model: no progress bar
    try:
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
    finally:
        keras.utils.enable_interactive_logging()
    version = str(info.registered_model_version)
    MlflowClient().set_model_version_tag(registered_name, version, KERAS_SHA256_TAG, keras_sha256)
    return version


VAL_LOG_LOSS_TAG = "val_log_loss"  # model version tag: the calibrated validation log-loss the promotion rule compares
PROMOTED_BY_TAG, PROMOTED_AT_TAG, PROMOTION_REASON_TAG = "promoted_by", "promoted_at", "promotion_reason"


def champion_version(name: str):
    """The ModelVersion holding the champion alias, or None when there is none (or no such model yet)."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def promotion_decision(log_loss: float, champion_log_loss: float | None, margin: float,
                       champion: str | None = None) -> tuple[bool, str]:
    """(promote?, why): the rule of the register stage (docs/tracking.md, "Which version is champion").

    A version becomes champion when there is none, when the champion has no validation log-loss to
    compare with (registered before this rule), or when its own validation log-loss is lower than
    the champion's by at least `margin`.
    """
    if champion is None:
        return True, "no champion yet"
    if champion_log_loss is None:
        return True, f"champion {champion} has no validation log-loss to compare with (registered before this rule)"
    gain = champion_log_loss - log_loss
    if gain >= margin:
        return True, (f"validation log-loss {log_loss:.4f} is {gain:.4f} below champion {champion}'s "
                      f"{champion_log_loss:.4f} (margin {margin:g})")
    return False, (f"validation log-loss {log_loss:.4f} vs champion {champion}'s {champion_log_loss:.4f}: "
                   f"not lower by the margin {margin:g}")


def promote_if_lower_log_loss(name: str, version: str, log_loss: float, margin: float) -> dict:
    """Tag `version` with its validation log-loss and make it champion if the rule says so (promotion_decision).

    Returns what registered.json records: promoted, reason, the previous champion and its log-loss.
    """
    client = MlflowClient()
    client.set_model_version_tag(name, version, VAL_LOG_LOSS_TAG, repr(float(log_loss)))
    current = champion_version(name)
    current_loss = None
    if current is not None and VAL_LOG_LOSS_TAG in current.tags:
        current_loss = float(current.tags[VAL_LOG_LOSS_TAG])
    promoted, reason = promotion_decision(log_loss, current_loss, margin,
                                          None if current is None else str(current.version))
    if promoted:
        set_champion(name, version, by="register stage", reason=reason)
    return {"promoted": promoted, "reason": reason,
            "champion_before": None if current is None else str(current.version),
            "champion_val_log_loss": current_loss}


def set_champion(name: str, version: str, by: str, reason: str = "") -> str | None:
    """Move the champion alias to `version`, recording who, when and why on it; returns the previous champion's version.

    Raises MlflowException when the version does not exist.
    """
    from datetime import datetime, timezone

    client = MlflowClient()
    client.get_model_version(name, version)  # fails on a version that does not exist
    previous = champion_version(name)
    client.set_registered_model_alias(name, CHAMPION, version)
    for key, value in ((PROMOTED_BY_TAG, by), (PROMOTED_AT_TAG, datetime.now(timezone.utc).isoformat(timespec="seconds")),
                       (PROMOTION_REASON_TAG, reason)):
        client.set_model_version_tag(name, version, key, value)
    return None if previous is None else str(previous.version)
