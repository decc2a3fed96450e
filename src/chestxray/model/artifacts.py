"""Where a trained model's files lie: the pipeline's artifacts/ layout, in one place.

    artifacts/training/    model.keras, model_info.json   (train)
    artifacts/evaluation/  thresholds.json, metrics.json, model_card.md   (evaluate, model_card)
    artifacts/export/      model.onnx   (export)
    artifacts/reference/   reference.npz, ood.json   (reference; file names in chestxray.model.ood)
    artifacts/xray_check/  detector.npz, xray_check.json   (xray_check; the detector's file: chestxray.model.xray_detector)

A registered model is downloaded into the same layout (chestxray.model.registry).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TRAINING_DIR = "training"
EVALUATION_DIR = "evaluation"
EXPORT_DIR = "export"
REFERENCE_DIR = "reference"
XRAY_CHECK_DIR = "xray_check"
MODEL_FILE = "model.keras"
INFO_FILE = "model_info.json"
THRESHOLDS_FILE = "thresholds.json"
METRICS_FILE = "metrics.json"
MODEL_CARD_FILE = "model_card.md"
ONNX_FILE = "model.onnx"
XRAY_CHECK_FILE = "xray_check.json"  # the detector's leave-one-source-out figures


class ModelNotFound(FileNotFoundError):
    """No trained model where one was expected; the message says how to get one."""


@dataclass(frozen=True)
class ModelFiles:
    """The folders a predictor is loaded from; all but `model_dir` are optional."""

    model_dir: Path  # model.keras + model_info.json
    evaluation_dir: Path | None = None  # thresholds, metrics, model card: without them temperature 1, threshold 0.5
    onnx_path: Path | None = None  # the exported model.onnx, when there is one
    reference_dir: Path | None = None  # the validated population's reference: without it no population warning
    xray_check_dir: Path | None = None  # the "not a chest X-ray" detector: without it nothing is refused as such

    @classmethod
    def from_artifacts(cls, root: str | Path = "artifacts") -> "ModelFiles":
        """The files `dvc repro` writes under `root`."""
        root = Path(root)
        return cls(root / TRAINING_DIR, root / EVALUATION_DIR, root / EXPORT_DIR / ONNX_FILE, root / REFERENCE_DIR,
                   root / XRAY_CHECK_DIR)

    @property
    def model_path(self) -> Path:
        return Path(self.model_dir) / MODEL_FILE


def read_model_info(model_dir: str | Path) -> dict:
    """model_info.json of a training output (classes, image size, ...); ModelNotFound saying what to run."""
    model_dir = Path(model_dir)
    if not (model_dir / MODEL_FILE).is_file():
        raise ModelNotFound(f"no trained model at {model_dir / MODEL_FILE} -- run `dvc repro` (or `python main.py`) "
                            "first")
    if not (model_dir / INFO_FILE).is_file():  # train writes it last: without it the output is incomplete
        raise ModelNotFound(f"the training output in {model_dir} is incomplete (no {INFO_FILE}: the train stage "
                            "did not finish) -- run `dvc repro` (or `python main.py`) again")
    return json.loads((model_dir / INFO_FILE).read_text())


def read_evaluation(evaluation_dir: str | Path | None) -> tuple[dict | None, dict | None, str | None]:
    """(thresholds, metrics, model card Markdown) from an evaluation folder; None for each file not there."""
    if evaluation_dir is None:
        return None, None, None
    folder = Path(evaluation_dir)
    thresholds, metrics = ((json.loads((folder / name).read_text()) if (folder / name).is_file() else None)
                           for name in (THRESHOLDS_FILE, METRICS_FILE))
    card = (folder / MODEL_CARD_FILE).read_text() if (folder / MODEL_CARD_FILE).is_file() else None
    return thresholds, metrics, card
