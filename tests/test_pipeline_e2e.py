"""End to end: `dvc repro` in a fresh git+DVC repo on a small real subset, then MLflow and DVC behaviour."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow

CLASSES = ("NORMAL", "PNEUMONIA")


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _subset(kermany224: Path, dest: Path, per_class: dict[str, int]) -> None:
    """Copy the first n real images of each class and split (sorted, so patients stay together mostly)."""
    for split, n in per_class.items():
        for label in CLASSES:
            target = dest / split / label
            target.mkdir(parents=True)
            for path in sorted((kermany224 / split / label).glob("*.jpeg"))[:n]:
                shutil.copy(path, target)


@pytest.fixture(scope="module")
def project(tmp_path_factory, kermany224):
    """A git+DVC repo holding this project's pipeline with tiny params, and the env to run it."""
    tmp = tmp_path_factory.mktemp("e2e")
    data = tmp / "source"
    _subset(kermany224, data, {"train": 40, "test": 12})
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "config"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source=str(data), val_fraction=0.25)
    params["base_model"].update(backbone="mobilenetv2", weights="none", image_size=96)
    params["train"].update(head_epochs=2, fine_tune_epochs=1, augment_views=1, batch_size=16)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "pipeline"], repo, env)
    first = _run(["dvc", "repro"], repo, env)
    return repo, env, params, first


def test_repro_writes_metrics_and_plots(project):
    repo, _, _, _ = project
    metrics = json.loads((repo / "artifacts/evaluation/metrics.json").read_text())
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "ece"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["n_test"] == 24
    assert set(metrics["per_class"]) == set(CLASSES)
    thresholds = json.loads((repo / "artifacts/evaluation/thresholds.json").read_text())
    assert thresholds["chosen_on"] == "validation" and 0.0 <= thresholds["decision_threshold"] <= 1.0
    for name in ("confusion.png", "roc.png", "calibration.png"):
        assert (repo / "artifacts/evaluation/figures" / name).stat().st_size > 5000
    info = json.loads((repo / "artifacts/training/model_info.json").read_text())
    assert info["classes"] == list(CLASSES) and info["image_size"] == 96
    check = json.loads((repo / "artifacts/export/check.json").read_text())
    assert check["passed"] and check["n_images"] == 24 and check["mismatched"] == []
    assert check["max_abs_diff"] <= 1e-4
    assert (repo / "artifacts/export/model.onnx").stat().st_size > 100_000


def test_repro_calibrates_on_validation_and_runs_robustness_and_model_card(project):
    repo, _, _, _ = project
    thresholds = json.loads((repo / "artifacts/evaluation/thresholds.json").read_text())
    assert 0.05 <= thresholds["temperature"] <= 20 and thresholds["tta"] is False
    assert thresholds["low_confidence_rule"]["target_accuracy"] == 0.9
    metrics = json.loads((repo / "artifacts/evaluation/metrics.json").read_text())
    assert metrics["temperature"] == thresholds["temperature"]
    assert 0.0 <= metrics["ece_uncalibrated"] <= 1.0 and 0.0 <= metrics["val"]["ece_uncalibrated"] <= 1.0
    assert metrics["low_confidence"]["threshold"] == thresholds["low_confidence"]
    robustness = json.loads((repo / "artifacts/robustness/metrics.json").read_text())
    assert robustness["n_images"] == 24 and robustness["backend"] == "onnx"
    assert len(robustness["variants"]) == 18 and "worst_accuracy_drop" in robustness
    card = (repo / "artifacts/evaluation/model_card.md").read_text()
    assert "mobilenetv2" in card and f"T = {thresholds['temperature']:.3f}" in card
    assert f"**{robustness['worst_accuracy_drop']['drop']:.3f}**" in card


def test_mlflow_run_and_registered_champion(project):
    repo, env, _, _ = project
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    run_id = json.loads((repo / "artifacts/training/mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["base_model.backbone"] == "mobilenetv2"
    assert len(run.data.params["data.sha256"]) == 64
    assert "test.roc_auc" in run.data.metrics and "test.ece" in run.data.metrics
    assert len(client.get_metric_history(run_id, "val_auc")) >= 2  # per-epoch, both phases
    artifacts = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert "figures/roc.png" in artifacts
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert {"export/model.onnx", "export/check.json"} <= exported
    assert "robustness.worst_accuracy_drop" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run_id, "evaluation")} >= {"evaluation/model_card.md"}
    assert run.data.metrics["export.max_abs_diff"] <= 1e-4
    champion = client.get_model_version_by_alias("chestxray", "champion")
    assert champion.run_id == run_id


def test_second_repro_does_nothing_and_train_param_reruns_only_the_stages_after_train(project):
    repo, env, params, _ = project
    again = _run(["dvc", "repro"], repo, env)
    assert "Running stage" not in again.stdout, again.stdout
    changed = _run(["dvc", "exp", "run", "-S", "train.head_lr=0.002"], repo, env)
    ran = {line.split("'")[1] for line in changed.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "evaluate", "export", "robustness", "model_card"}, changed.stdout
    robustness_only = _run(["dvc", "exp", "run", "-S", "robustness.seed=7"], repo, env)
    ran = {line.split("'")[1] for line in robustness_only.stdout.splitlines() if line.startswith("Running stage")}
    assert "robustness" in ran and ran <= {"robustness", "model_card"}, robustness_only.stdout  # card: if it changed


def test_registered_model_loads_from_registry(project):
    _, env, _, _ = project
    import mlflow
    import numpy as np

    from chestxray.model.classifier import Classifier

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    clf = Classifier.from_registry("chestxray", "champion")
    assert clf.classes == list(CLASSES) and clf.version.startswith("chestxray/")
    assert clf.card_path is not None and "# Model card" in clf.card_path.read_text()  # from the run's artifacts
    assert clf.temperature != 1.0  # thresholds.json travels with the registered model
    probs = clf.probabilities(np.full((1, 96, 96, 3), 128, np.float32))
    assert probs.shape == (1, 2) and abs(float(probs.sum()) - 1.0) < 1e-4
