"""An MLflow run left RUNNING by a killed stage is marked KILLED by the next train stage; live ones are left alone."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import mlflow
from mlflow import MlflowClient

from chestxray import tracking


def test_start_run_closes_runs_of_dead_processes_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = {"mlflow": {"experiment": "chestxray"}}
    tracking.setup(config)
    client = MlflowClient()
    experiment = mlflow.get_experiment_by_name("chestxray").experiment_id
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid now belongs to no process
    here = socket.gethostname()
    holders = {"dead": (here, child.pid), "alive": (here, os.getpid()), "elsewhere": ("other-host", child.pid)}
    runs = {name: client.create_run(experiment, tags={tracking.HOST_TAG: host, tracking.PID_TAG: str(pid)}).info.run_id
            for name, (host, pid) in holders.items()}

    with tracking.start_run(config, tmp_path / "mlflow_run.json") as run:
        assert client.get_run(run.info.run_id).data.tags[tracking.PID_TAG] == str(os.getpid())
    status = {name: client.get_run(run_id).info.status for name, run_id in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING"}
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
