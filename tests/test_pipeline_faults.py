"""A pipeline run killed in the middle of training, and runs started while another runs.

The slow test drives the real `dvc repro` in a throwaway git+DVC repository (tests/dvc_project.py):
it stops the run once the train stage is under way, starts a second `dvc repro` and a
`python main.py` (both must be refused cleanly and change nothing), kills the first run outright
(SIGKILL to its whole process group, as a power cut or the OOM killer would), and runs `dvc repro`
again: it must finish with a model that loads and predicts.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from chestxray.model.artifacts import INFO_FILE, ModelFiles, ModelNotFound
from chestxray.model.predictor import Predictor
from dvc_project import CLASSES, make_project, run_ok

TRAIN_UNDER_WAY = "cached activations"  # printed by the train stage once its activation cache is built


def test_training_output_without_model_info_is_reported_as_incomplete(tiny_artifacts, tmp_path):
    training = shutil.copytree(tiny_artifacts / "training", tmp_path / "training")
    (training / INFO_FILE).unlink()  # train writes it last: a run killed before that leaves no model_info.json
    with pytest.raises(ModelNotFound, match="incomplete .*no model_info.json.*run `dvc repro`"):
        Predictor.load(ModelFiles(training))


def _wait_for(repro: subprocess.Popen, lines: list[str], marker: str) -> None:
    """Read the run's output until a line contains `marker`; fail if the run ends first."""
    watchdog = threading.Timer(600, lambda: os.killpg(repro.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in repro.stdout:
            lines.append(line)
            if marker in line:
                return
    finally:
        watchdog.cancel()
    pytest.fail(f"dvc repro ended before {marker!r}:\n{''.join(lines)[-3000:]}")


def _mlflow_status(env: dict, run_id: str) -> str:
    from mlflow import MlflowClient

    return MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id).info.status


@pytest.mark.slow
def test_killed_in_training_then_repro_finishes_and_concurrent_runs_are_refused(tmp_path, kermany224):
    project = make_project(tmp_path, kermany224)
    repo, env, artifacts = project.repo, project.env, project.repo / "artifacts"
    repro = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)  # its own process group, to kill
    lines: list[str] = []
    try:
        _wait_for(repro, lines, TRAIN_UNDER_WAY)
        os.killpg(repro.pid, signal.SIGSTOP)  # hold the run in the middle of training while we try the others
        manifest = (artifacts / "data" / "manifest.csv").read_bytes()
        killed_run = json.loads((artifacts / "training" / "mlflow_run.json").read_text())["run_id"]
        assert _mlflow_status(env, killed_run) == "RUNNING"

        second = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0 and "Traceback" not in second.stderr
        # DVC's own refusal (its record of the outputs the first run holds), before it deletes anything.
        assert "failed to reproduce" in second.stderr and "is busy" in second.stderr, second.stderr
        assert f"(PID {repro.pid}): " in second.stderr and "Running stage" not in second.stdout

        by_hand = subprocess.run([sys.executable, "main.py"], cwd=repo, env=env, capture_output=True, text=True,
                                 timeout=300)
        holder = (artifacts / ".pipeline.lock").read_text().strip()
        assert by_hand.returncode == 1 and by_hand.stderr.strip().splitlines() == [
            f"error: another pipeline run (pid {holder}) is in progress: wait for it to finish, "
            f"or stop it (kill {holder}) and run again"], by_hand.stderr
        assert (artifacts / "data" / "manifest.csv").read_bytes() == manifest  # neither touched the data
    finally:
        os.killpg(repro.pid, signal.SIGKILL)
        repro.wait()
    assert not (artifacts / "training" / INFO_FILE).exists()  # the run really died mid-training

    again = run_ok(["dvc", "repro"], repo, env)
    ran = {line.split("'")[1] for line in again.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "evaluate", "reference", "export", "robustness", "model_card", "register"}, again.stdout  # ingest, prepare_base_model had completed
    assert f"MLflow run {killed_run} was left running" in again.stdout
    assert _mlflow_status(env, killed_run) == "KILLED"

    metrics = json.loads((artifacts / "evaluation" / "metrics.json").read_text())
    assert 0.0 <= metrics["roc_auc"] <= 1.0 and metrics["n_test"] > 0
    clf = Predictor.from_artifacts(artifacts)
    image = next((artifacts / "data" / "images" / "test" / CLASSES[0]).glob("*.jpeg")).read_bytes()
    prediction = clf.predict_bytes(image)
    assert prediction.predicted_class in CLASSES and abs(sum(prediction.probabilities.values()) - 1) < 1e-4
    assert not [p for p in artifacts.rglob("*") if ".partial-" in p.name]  # no temporary file left anywhere
    new_run = json.loads((artifacts / "training" / "mlflow_run.json").read_text())["run_id"]
    assert _mlflow_status(env, new_run) == "FINISHED"
