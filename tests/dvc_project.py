"""A throwaway copy of this project as a git+DVC repository, on a small real subset with tiny params.

Used by the end-to-end tests (test_pipeline_e2e.py, test_pipeline_faults.py) to run the real
`dvc repro` exactly as a user would, without touching this checkout's artifacts or MLflow store.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from helpers import FULLSIZE, ROOT, TB256, XCEPTION_WEIGHTS, need

CLASSES = ("NORMAL", "PNEUMONIA")
TRAIN_PER_CLASS, TEST_PER_CLASS = 40, 12
STORE = "mlflow.db"  # the project's private MLflow store (SQLite), beside the repo


def _store_uri(path: Path) -> str:
    return f"sqlite:///{path}"


@dataclass
class Project:
    repo: Path
    env: dict[str, str]  # what a user's shell would have: the venv first on PATH, a private MLflow store
    params: dict


def copy_subset(kermany224: Path, dest: Path, per_class: dict[str, int]) -> None:
    """Copy the first n real images of each class and split (sorted, so patients stay together mostly)."""
    for split, n in per_class.items():
        for label in CLASSES:
            target = dest / split / label
            target.mkdir(parents=True)
            for path in sorted((kermany224 / split / label).glob("*.jpeg"))[:n]:
                shutil.copy(path, target)


def run_ok(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command in the project; fail the test with its output if it fails."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def make_project(tmp: Path, kermany224: Path) -> Project:
    """A git+DVC repo holding this project's pipeline (dvc.yaml, config, src, research results) with tiny params, committed."""
    data = tmp / "source"
    copy_subset(kermany224, data, {"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS})
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "config", "main.py", "research/results"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / name)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source=str(data), val_fraction=0.25)
    # Pretrained weights: an untrained backbone's frozen features are all zero in the cache (train refuses them).
    params["base_model"].update(backbone="xception", weights=str(need(XCEPTION_WEIGHTS)), image_size=96)
    params["train"].update(head_epochs=20, fine_tune_epochs=1, augment_views=1, batch_size=16)
    # A detector that knows children and adults (tb256 as one extra source) well enough never to refuse the
    # Kermany test films these tests send; its quality is measured by the real stage, not here.
    params["xray_check"].update(extra_sources=[str(need(FULLSIZE)), str(need(TB256))], max_per_origin=150,
                                fold_max_per_origin=100, variants=3, epochs=12)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "MLFLOW_TRACKING_URI": _store_uri(tmp / STORE),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run_ok(["git", "init", "-q"], repo, env)
    run_ok(["dvc", "init", "-q"], repo, env)
    run_ok(["git", "add", "-A"], repo, env)
    run_ok(["git", "commit", "-qm", "pipeline"], repo, env)
    return Project(repo, env, params)


def copy_project(repo: Path, env: dict, dest: Path) -> tuple[Path, dict]:
    """A copy of a project (workspace, git, DVC cache) and of its MLflow store under `dest`, and the env
    that points at the copy's store: for a test that changes the project (`dvc exp run`) while others read it."""
    shutil.copytree(repo, dest / "repo", symlinks=True)
    shutil.copy(env["MLFLOW_TRACKING_URI"].removeprefix(_store_uri("")), dest / STORE)
    return dest / "repo", {**env, "MLFLOW_TRACKING_URI": _store_uri(dest / STORE)}
